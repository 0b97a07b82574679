// Open and verify a usfm-edge bundle: the C++ twin of usfm_edge/runtime/bundle_io.py::verify_bundle.
#include "bundle.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>
#include <sstream>

#include <openssl/evp.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace usfm {
namespace {

const char* kMetaFile = "usfm.json";
const char* kSumsFile = "SHA256SUMS";
// Files build_engine.sh writes on a device after export; allowed without a checksum (bundle_io.DEVICE_BUILT_FILES).
const std::set<std::string> kDeviceBuiltFiles = {"model.engine", "timing.cache", "build_engine.log"};
// The optional Ed25519 signature of SHA256SUMS (usfm-edge sign; bundle_io.SIGNATURE_FILE): allowed without a
// checksum. This host does not check it; docs/embedding.md "Signed bundles" shows the OpenSSL calls that do.
const char* const kSignatureFile = "SIGNATURE";

// Read a whole file once. Refuses symlinks (O_NOFOLLOW) and anything that is not a regular file (fstat on the
// opened descriptor, so the check and the read concern the same file).
std::vector<std::uint8_t> read_regular_file(const fs::path& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == ELOOP) throw BundleError("'" + path.filename().string() + "' is a symbolic link: refused (" +
                                            path.string() + "); copy the real file into the bundle");
        if (err == ENOENT) throw BundleError("file '" + path.filename().string() + "' listed in " + kSumsFile +
                                             " is missing (" + path.string() + ")");
        throw BundleError("cannot open '" + path.string() + "': " + std::strerror(err));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw BundleError("'" + path.filename().string() + "' is not a regular file: refused (" + path.string() + ")");
    }
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(st.st_size));
    std::size_t done = 0;
    while (done < bytes.size()) {
        ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            ::close(fd);
            throw BundleError("cannot read '" + path.string() + "' (truncated while reading?)");
        }
        done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    return bytes;
}

bool is_plain_name(const std::string& name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
           name.find('\\') == std::string::npos;
}

// SHA256SUMS (sha256sum format: "<64 hex>  <name>" per line, an optional '*' before the name) -> name -> digest.
std::map<std::string, std::string> parse_sums(const std::vector<std::uint8_t>& bytes, const fs::path& path) {
    std::map<std::string, std::string> sums;
    std::istringstream in(std::string(bytes.begin(), bytes.end()));
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.find_first_not_of(" \t") == std::string::npos) continue;
        std::size_t sep = line.find("  ");
        std::string digest = line.substr(0, sep == std::string::npos ? line.size() : sep);
        std::string name = sep == std::string::npos ? "" : line.substr(sep + 2);
        if (!name.empty() && name.front() == '*') name.erase(0, 1);
        bool hex = digest.size() == 64 && digest.find_first_not_of("0123456789abcdef") == std::string::npos;
        if (!hex || name.empty())
            throw BundleError(std::string(kSumsFile) + " line " + std::to_string(n) + " is malformed (" +
                              path.string() + ")");
        if (!is_plain_name(name))
            throw BundleError(std::string(kSumsFile) + " line " + std::to_string(n) +
                              " names a path outside the bundle: '" + name + "'");
        sums[name] = digest;
    }
    return sums;
}

void parse_contract(Bundle& b) {
    const json& m = b.meta;
    try {
        b.task = m.at("task").get<std::string>();
        b.backend = m.at("backend").get<std::string>();
        b.target = m.at("target").get<std::string>();
        b.precision = m.at("precision").get<std::string>();
        b.labels = m.value("labels", std::vector<std::string>{});
        const json& in = m.at("input");
        b.input_name = in.at("tensor").at("name").get<std::string>();
        b.raw_frame = in.value("raw_frame", true);
        b.min_side = in.value("min_side", 8);
        b.max_side = in.value("max_side", 4096);
        if (in.contains("static_hw") && !in.at("static_hw").is_null()) {
            auto hw = in.at("static_hw").get<std::vector<int>>();
            if (hw.size() != 2 || hw[0] < 1 || hw[1] < 1) throw BundleError("usfm.json input.static_hw must be [H, W]");
            b.static_hw = std::array<int, 2>{hw[0], hw[1]};
        }
        b.img_size = m.at("preprocessing").at("img_size").get<int>();
        for (const json& o : m.at("outputs"))
            b.outputs.push_back({o.at("name").get<std::string>(), o.at("dtype").get<std::string>()});
        if (!m.at("files").is_object()) throw BundleError("usfm.json 'files' must map roles to file names");
    } catch (const json::exception& e) {
        throw BundleError(std::string("usfm.json lacks a required entry or has a wrong type: ") + e.what());
    }
    if (b.outputs.empty()) throw BundleError("usfm.json lists no outputs");
    if (b.min_side < 1 || b.min_side > b.max_side) throw BundleError("usfm.json input sides are inconsistent");
}

}  // namespace

std::string sha256_hex(const std::uint8_t* data, std::size_t size) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1 && EVP_DigestUpdate(ctx, data, size) == 1 &&
              EVP_DigestFinal_ex(ctx, digest, &len) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) throw std::runtime_error("OpenSSL SHA-256 failed");
    static const char* hexdigits = "0123456789abcdef";
    std::string hex;
    for (unsigned int i = 0; i < len; ++i) {
        hex += hexdigits[digest[i] >> 4];
        hex += hexdigits[digest[i] & 15];
    }
    return hex;
}

const std::vector<std::uint8_t>& Bundle::file(const std::string& role) const {
    return files.at(meta.at("files").at(role).get<std::string>());
}

bool Bundle::has_file(const std::string& role) const {
    const json& f = meta.at("files");
    return f.contains(role) && f.at(role).is_string() && files.count(f.at(role).get<std::string>());
}

Bundle open_bundle(const fs::path& folder) {
    if (!fs::is_directory(folder)) throw BundleError("bundle folder not found: " + folder.string());
    Bundle b;
    b.folder = folder;
    fs::path sums_path = folder / kSumsFile;
    if (!fs::exists(fs::symlink_status(sums_path)))
        throw BundleError(std::string(kSumsFile) + " is missing: not a usfm-edge bundle or an incomplete copy (" +
                          folder.string() + ")");
    auto sums = parse_sums(read_regular_file(sums_path), sums_path);
    if (!sums.count(kMetaFile))
        throw BundleError(std::string(kMetaFile) + " is not covered by " + kSumsFile + " (" + folder.string() + ")");

    // usfm.json first: a newer schema is reported as such (as the Python runtime does), not as a hash mismatch.
    auto meta_bytes = read_regular_file(folder / kMetaFile);
    try {
        b.meta = json::parse(meta_bytes.begin(), meta_bytes.end());
    } catch (const json::parse_error& e) {
        throw BundleError(std::string(kMetaFile) + " is not valid JSON: " + e.what());
    }
    const json& version = b.meta.contains("schema_version") ? b.meta.at("schema_version") : json();
    if (!version.is_number_integer() || version.get<int>() < 1)
        throw BundleError("usfm.json schema_version must be a positive integer");
    b.schema_version = version.get<int>();
    if (b.schema_version > kSchemaVersion)
        throw BundleError("bundle schema version " + std::to_string(b.schema_version) +
                          " was written by a newer usfm-edge (this host reads up to " + std::to_string(kSchemaVersion) +
                          "): update the host, or export the bundle with the usfm-edge this host was built for");

    // every listed file: read once, hash those bytes, keep them for the loader
    for (const auto& [name, digest] : sums) {
        auto bytes = name == kMetaFile ? std::move(meta_bytes) : read_regular_file(folder / name);
        if (sha256_hex(bytes.data(), bytes.size()) != digest)
            throw BundleError("file '" + name + "' does not match its SHA-256 in " + kSumsFile +
                              " (corrupt or modified): re-copy the bundle or export it again (" +
                              (folder / name).string() + ")");
        b.files.emplace(name, std::move(bytes));
    }
    parse_contract(b);
    for (const auto& [role, value] : b.meta.at("files").items()) {
        if (!value.is_string() || !is_plain_name(value.get<std::string>()))
            throw BundleError("usfm.json files['" + role + "'] must be a plain file name inside the bundle");
        std::string name = value.get<std::string>();
        if (!sums.count(name) && !kDeviceBuiltFiles.count(name))
            throw BundleError("file '" + name + "' (" + role + ") is not covered by " + kSumsFile);
    }
    for (const auto& entry : fs::directory_iterator(folder)) {
        std::string name = entry.path().filename().string();
        if (!sums.count(name) && name != kSumsFile && name != kSignatureFile && !kDeviceBuiltFiles.count(name))
            throw BundleError("file '" + name + "' is not listed in " + kSumsFile +
                              ": remove it, or export the bundle again");
    }
    return b;
}

}  // namespace usfm
