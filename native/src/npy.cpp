#include "scalearn_fast/npy.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace scalearn_fast {
namespace {

const char kMagic[] = "\x93NUMPY";

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw std::runtime_error(path + ": " + why);
}

// The value of `key` in the header dict, up to the next ',' outside brackets/quotes.
std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  const std::string quoted = "'" + key + "'";
  auto at = header.find(quoted);
  if (at == std::string::npos) fail(path, "npy header has no " + quoted + ": " + header);
  at = header.find(':', at + quoted.size());
  if (at == std::string::npos) fail(path, "bad npy header: " + header);
  ++at;
  int depth = 0;
  bool in_quote = false;
  std::string value;
  for (; at < header.size(); ++at) {
    char c = header[at];
    if (c == '\'') in_quote = !in_quote;
    if (!in_quote && (c == '(' || c == '[')) ++depth;
    if (!in_quote && (c == ')' || c == ']')) --depth;
    if (!in_quote && depth == 0 && (c == ',' || c == '}')) break;
    value += c;
  }
  auto first = value.find_first_not_of(" ");
  auto last = value.find_last_not_of(" ");
  return first == std::string::npos ? "" : value.substr(first, last - first + 1);
}

at::ScalarType dtype_of(const std::string& descr, const std::string& path) {
  if (descr == "'<i8'") return at::kLong;
  if (descr == "'<i4'") return at::kInt;
  if (descr == "'<f4'") return at::kFloat;
  if (descr == "'<f2'") return at::kHalf;
  if (descr == "'<f8'") return at::kDouble;
  if (descr == "'|b1'") return at::kBool;
  fail(path, "unsupported npy dtype " + descr + " (expected <i8, <i4, <f4, <f2, <f8 or |b1)");
}

std::string descr_of(at::ScalarType t) {
  switch (t) {
    case at::kLong: return "<i8";
    case at::kInt: return "<i4";
    case at::kFloat: return "<f4";
    case at::kHalf: return "<f2";
    case at::kDouble: return "<f8";
    case at::kBool: return "|b1";
    default: throw std::runtime_error(std::string("write_npy: unsupported dtype ") + c10::toString(t));
  }
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  if (text.size() < 2 || text.front() != '(' || text.back() != ')') fail(path, "bad npy shape " + text);
  std::vector<int64_t> shape;
  std::stringstream items(text.substr(1, text.size() - 2));
  std::string item;
  while (std::getline(items, item, ',')) {
    auto first = item.find_first_not_of(" ");
    if (first == std::string::npos) continue;  // the trailing comma of a 1-tuple
    try {
      shape.push_back(std::stoll(item.substr(first)));
    } catch (const std::exception&) {
      fail(path, "bad npy shape " + text);
    }
    if (shape.back() < 0) fail(path, "bad npy shape " + text);
  }
  return shape;
}

}  // namespace

at::Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open");
  char magic[6];
  unsigned char version[2];
  in.read(magic, 6);
  in.read(reinterpret_cast<char*>(version), 2);
  if (!in || std::memcmp(magic, kMagic, 6) != 0) fail(path, "not a .npy file (bad magic)");
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else if (version[0] == 2 || version[0] == 3) {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  } else {
    fail(path, "unsupported .npy format version " + std::to_string(version[0]));
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) fail(path, "truncated .npy header");
  if (header_value(header, "fortran_order", path) != "False") {
    fail(path, "Fortran-order arrays are not supported (save with np.ascontiguousarray)");
  }
  auto dtype = dtype_of(header_value(header, "descr", path), path);
  auto shape = parse_shape(header_value(header, "shape", path), path);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  auto bytes = static_cast<std::streamsize>(out.numel() * out.element_size());
  in.read(static_cast<char*>(out.data_ptr()), bytes);
  if (in.gcount() != bytes) {
    fail(path, "holds " + std::to_string(in.gcount()) + " data bytes; its header needs " + std::to_string(bytes));
  }
  return out;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().to(at::kCPU);
  if (t.scalar_type() == at::kBFloat16) t = t.to(at::kFloat);
  t = t.contiguous();
  std::string shape = "(";
  for (auto s : t.sizes()) shape += std::to_string(s) + ", ";
  if (t.dim() > 1) shape.resize(shape.size() - 2);  // (a, b); a 1-tuple keeps "(a,"
  else if (t.dim() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header =
      "{'descr': '" + descr_of(t.scalar_type()) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;  // magic, version, length, header, '\n'
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream out(path, std::ios::binary);
  if (!out) fail(path, "cannot open for writing");
  out.write(kMagic, 6);
  const unsigned char version[2] = {1, 0};
  out.write(reinterpret_cast<const char*>(version), 2);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
  if (!out) fail(path, "write failed");
}

}  // namespace scalearn_fast
