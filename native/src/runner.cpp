#include "scalearn_fast/runner.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <sstream>
#include <stdexcept>

namespace scalearn_fast {

std::vector<std::string> split_names(const std::string& joined) {
  std::vector<std::string> names;
  std::stringstream items(joined);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (!item.empty()) names.push_back(item);
  }
  return names;
}

PackageRunner::PackageRunner(const std::string& package_path)
    : loader_(std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path)) {
  auto metadata = loader_->get_metadata();
  auto inputs = metadata.find("scalearn_fast.inputs");
  if (inputs == metadata.end()) {
    throw std::runtime_error(package_path +
                             ": no scalearn_fast.inputs in the package metadata (not written by "
                             "scalearn_fast.export?)");
  }
  inputs_ = split_names(inputs->second);
  outputs_ = split_names(metadata["scalearn_fast.outputs"]);
  auto device = metadata.find("AOTI_DEVICE_KEY");
  device_ = device == metadata.end() ? "cpu" : device->second;
}

PackageRunner::~PackageRunner() = default;

std::vector<std::pair<std::string, at::Tensor>> PackageRunner::run(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask) {
  if (input_ids.dim() != 2) {
    throw std::runtime_error("input_ids must be [batch, seq]; got " + std::to_string(input_ids.dim()) +
                             " dims");
  }
  if (attention_mask && attention_mask->sizes() != input_ids.sizes()) {
    std::ostringstream msg;
    msg << "attention_mask has shape " << attention_mask->sizes() << ", input_ids " << input_ids.sizes()
        << "; they must match";
    throw std::runtime_error(msg.str());
  }
  const auto device = c10::Device(device_);
  const auto ids = input_ids.to(at::kLong);
  std::vector<at::Tensor> inputs;
  for (const auto& name : inputs_) {
    if (name == "input_ids") {
      inputs.push_back(ids);
    } else if (name == "attention_mask") {
      inputs.push_back(attention_mask ? attention_mask->to(at::kLong) : at::ones_like(ids));
    } else if (name == "token_type_ids") {
      inputs.push_back(at::zeros_like(ids));
    } else {
      throw std::runtime_error("the package takes an input '" + name +
                               "' that scalearn-run cannot fill (it fills input_ids, attention_mask, "
                               "token_type_ids)");
    }
    inputs.back() = inputs.back().to(device).contiguous();
  }
  auto outputs = loader_->run(inputs);
  std::vector<std::pair<std::string, at::Tensor>> named;
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::string name = i < outputs_.size() ? outputs_[i] : "output_" + std::to_string(i);
    named.emplace_back(name, outputs[i].to(at::kCPU));
  }
  return named;
}

}  // namespace scalearn_fast
