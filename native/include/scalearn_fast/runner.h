// Running a scalearn_fast package (a .pt2 written by scalearn_fast.export) on token ids.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace scalearn_fast {

// A loaded package and the names of its inputs and outputs (from the package metadata that
// scalearn_fast.export writes: "scalearn_fast.inputs", "scalearn_fast.outputs").
class PackageRunner {
 public:
  explicit PackageRunner(const std::string& package_path);
  ~PackageRunner();

  const std::vector<std::string>& input_names() const { return inputs_; }
  const std::vector<std::string>& output_names() const { return outputs_; }
  // "cpu" or "cuda" (the device the package was compiled for).
  const std::string& device() const { return device_; }

  // The package's outputs for `input_ids` [batch, seq] (any integer dtype). The other inputs are
  // filled by name: "attention_mask" from `attention_mask` (all ones when absent),
  // "token_type_ids" with zeros. A package with any other input throws std::runtime_error.
  // Outputs are returned on the CPU, named as output_names().
  std::vector<std::pair<std::string, at::Tensor>> run(
      const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask = std::nullopt);

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::vector<std::string> inputs_;
  std::vector<std::string> outputs_;
  std::string device_;
};

// "a,b,c" -> {"a", "b", "c"}; "" -> {}.
std::vector<std::string> split_names(const std::string& joined);

}  // namespace scalearn_fast
