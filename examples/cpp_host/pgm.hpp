// Binary PGM (P5, 8-bit) frames: the example's stand-in for a scanner's B-mode buffer (H x W uint8, row-major).
#pragma once

#include <cctype>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace usfm {

struct Frame {
    std::string name;  // file stem, used to name the mask
    int height = 0, width = 0;
    std::vector<std::uint8_t> pixels;  // height * width, row-major
};

// Read an 8-bit binary PGM (P5, maxval <= 255); throws std::runtime_error naming the file.
inline Frame read_pgm(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open frame '" + path + "'");
    std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::size_t pos = 0;
    auto next_token = [&]() -> std::string {
        while (pos < data.size()) {  // whitespace and '#' comments between header fields
            if (std::isspace(static_cast<unsigned char>(data[pos]))) ++pos;
            else if (data[pos] == '#') while (pos < data.size() && data[pos] != '\n') ++pos;
            else break;
        }
        std::string tok;
        while (pos < data.size() && !std::isspace(static_cast<unsigned char>(data[pos]))) tok += data[pos++];
        return tok;
    };
    auto number = [&](const char* what) {
        std::string tok = next_token();
        if (tok.empty() || tok.find_first_not_of("0123456789") != std::string::npos || tok.size() > 6)
            throw std::runtime_error("frame '" + path + "': bad PGM " + what + " '" + tok + "'");
        return std::stoi(tok);
    };
    if (next_token() != "P5") throw std::runtime_error("frame '" + path + "' is not a binary PGM (P5)");
    Frame fr;
    fr.width = number("width");
    fr.height = number("height");
    int maxval = number("maxval");
    if (maxval < 1 || maxval > 255) throw std::runtime_error("frame '" + path + "' is not 8-bit (maxval " +
                                                             std::to_string(maxval) + ")");
    ++pos;  // the single whitespace byte after maxval
    std::size_t n = static_cast<std::size_t>(fr.width) * static_cast<std::size_t>(fr.height);
    if (n == 0 || data.size() < pos + n) throw std::runtime_error("frame '" + path + "' is empty or truncated");
    fr.pixels.assign(data.begin() + static_cast<std::ptrdiff_t>(pos),
                     data.begin() + static_cast<std::ptrdiff_t>(pos + n));
    return fr;
}

inline void write_pgm(const std::string& path, int height, int width, const std::uint8_t* pixels) {
    std::ofstream f(path, std::ios::binary);
    f << "P5\n" << width << " " << height << "\n255\n";
    f.write(reinterpret_cast<const char*>(pixels), static_cast<std::streamsize>(height) * width);
    if (!f) throw std::runtime_error("cannot write '" + path + "'");
}

}  // namespace usfm
