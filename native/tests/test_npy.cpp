// ctest: the .npy reader and writer round-trip every supported dtype and refuse bad files.
#include "scalearn_fast/npy.h"
#include "scalearn_fast/runner.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>

#include <unistd.h>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAIL: " << what << "\n";
    ++failures;
  }
}

template <typename F>
void check_throws(F&& f, const std::string& needle, const std::string& what) {
  try {
    f();
    check(false, what + ": no exception");
  } catch (const std::exception& e) {
    check(std::string(e.what()).find(needle) != std::string::npos,
          what + ": message '" + e.what() + "' lacks '" + needle + "'");
  }
}

}  // namespace

int main() {
  namespace fs = std::filesystem;
  const auto dir = fs::temp_directory_path() / ("scalearn_fast_npy_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const auto file = (dir / "a.npy").string();

  for (auto dtype : {at::kLong, at::kInt, at::kFloat, at::kHalf, at::kDouble}) {
    for (auto shape : {std::vector<int64_t>{2, 9}, std::vector<int64_t>{5}, std::vector<int64_t>{0, 3},
                       std::vector<int64_t>{}}) {
      auto t = at::arange(at::IntArrayRef(shape).size() ? c10::multiply_integers(shape) : 1)
                   .to(dtype)
                   .reshape(shape);
      scalearn_fast::write_npy(file, t);
      auto back = scalearn_fast::read_npy(file);
      check(back.scalar_type() == dtype && back.sizes() == t.sizes() && at::equal(back, t),
            std::string("round trip ") + c10::toString(dtype));
    }
  }
  auto bf16 = at::arange(6).to(at::kBFloat16).reshape({2, 3});
  scalearn_fast::write_npy(file, bf16);
  check(scalearn_fast::read_npy(file).scalar_type() == at::kFloat, "bfloat16 is written as float32");
  auto strided = at::arange(12).reshape({3, 4}).t();
  scalearn_fast::write_npy(file, strided);
  check(at::equal(scalearn_fast::read_npy(file), strided), "non-contiguous input");

  check_throws([&] { scalearn_fast::read_npy((dir / "missing.npy").string()); }, "cannot open", "missing file");
  {
    std::ofstream(dir / "junk.npy") << "not numpy";
  }
  check_throws([&] { scalearn_fast::read_npy((dir / "junk.npy").string()); }, "bad magic", "junk file");
  {  // a valid header whose data is short
    scalearn_fast::write_npy(file, at::arange(10));
    fs::resize_file(file, fs::file_size(file) - 8);
  }
  check_throws([&] { scalearn_fast::read_npy(file); }, "data bytes", "truncated data");
  check(scalearn_fast::split_names("input_ids,attention_mask").size() == 2, "split_names");
  check(scalearn_fast::split_names("").empty(), "split_names of nothing");
  check_throws([&] { scalearn_fast::PackageRunner((dir / "missing.pt2").string()); }, "", "missing package");

  fs::remove_all(dir);
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all npy checks passed\n";
  return 0;
}
