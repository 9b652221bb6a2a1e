// scalearn-run: run a scalearn_fast package (.pt2) on token ids from a .npy file, with no Python.
//
//   scalearn-run MODEL.pt2 INPUT_IDS.npy OUTPUT_DIR [--attention-mask MASK.npy]
//
// INPUT_IDS.npy holds int64 or int32 ids [batch, seq]; each output of the package is written as
// OUTPUT_DIR/<name>.npy (e.g. logits.npy) and listed on stdout with its shape.
#include "scalearn_fast/npy.h"
#include "scalearn_fast/runner.h"

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

int usage(const char* why) {
  std::cerr << "scalearn-run: " << why << "\n"
            << "usage: scalearn-run MODEL.pt2 INPUT_IDS.npy OUTPUT_DIR [--attention-mask MASK.npy]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::optional<std::string> mask_path;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      usage("run a scalearn_fast package on token ids");
      return 0;
    }
    if (arg == "--attention-mask") {
      if (i + 1 >= argc) return usage("--attention-mask needs a file");
      mask_path = argv[++i];
    } else if (arg.rfind("--", 0) == 0) {
      return usage(("unknown option " + arg).c_str());
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) return usage("expected MODEL.pt2 INPUT_IDS.npy OUTPUT_DIR");
  try {
    const auto ids = scalearn_fast::read_npy(positional[1]);
    if (ids.is_floating_point() || ids.scalar_type() == at::kBool) {
      throw std::runtime_error(positional[1] + ": token ids must be integers (int64 or int32)");
    }
    std::optional<at::Tensor> mask;
    if (mask_path) mask = scalearn_fast::read_npy(*mask_path);
    scalearn_fast::PackageRunner runner(positional[0]);
    auto outputs = runner.run(ids, mask);
    std::filesystem::create_directories(positional[2]);
    for (const auto& [name, tensor] : outputs) {
      auto file = std::filesystem::path(positional[2]) / (name + ".npy");
      scalearn_fast::write_npy(file.string(), tensor);
      std::cout << name << " " << tensor.sizes() << " -> " << file.string() << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "scalearn-run: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
