// Open and verify a usfm-edge bundle (NAME.usfm/) without Python: SHA256SUMS, usfm.json, the input contract.
//
// Every file listed in SHA256SUMS is read ONCE into memory (never through a symlink, regular files only), hashed
// with OpenSSL's EVP SHA-256 and compared; the very same bytes are what the host parses (usfm.json) and hands to
// OpenVINO (model.xml + model.bin, or model.onnx), so nothing can change between the check and the load.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace usfm {

// The newest usfm.json schema this host understands (usfm_edge.core.bundle_schema.SCHEMA_VERSION).
constexpr int kSchemaVersion = 1;

// A bundle this host refuses: tampered, incomplete, too new, or made for a backend/task it cannot run.
struct BundleError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct OutputSpec {
    std::string name;
    std::string dtype;  // uint8, float32, float16, int64
};

struct Bundle {
    std::filesystem::path folder;
    nlohmann::json meta;  // the whole usfm.json
    int schema_version = 0;
    std::string task, backend, target, precision;
    std::vector<std::string> labels;
    // input contract
    std::string input_name;
    bool raw_frame = true;
    int min_side = 8, max_side = 4096;
    std::optional<std::array<int, 2>> static_hw;  // (H, W) of a static-shape graph
    int img_size = 0;                              // preprocessing.img_size (the model's own input side)
    std::vector<OutputSpec> outputs;
    // verified bytes of every file listed in SHA256SUMS, by file name
    std::map<std::string, std::vector<std::uint8_t>> files;

    // The verified bytes of the file that usfm.json's `files` names for `role` (e.g. "openvino_xml").
    const std::vector<std::uint8_t>& file(const std::string& role) const;
    bool has_file(const std::string& role) const;
};

// Hex SHA-256 of a buffer (OpenSSL EVP).
std::string sha256_hex(const std::uint8_t* data, std::size_t size);

// Read SHA256SUMS, read + hash every listed file, parse usfm.json and check its schema version and contract.
// Throws BundleError naming the file and the fix.
Bundle open_bundle(const std::filesystem::path& folder);

}  // namespace usfm
