// usfm_host: run a usfm-edge segmentation bundle on a cine of raw uint8 grey frames with OpenVINO, no Python.
//
//   usfm_host BUNDLE.usfm --out DIR [--pixel-spacing MM | ROW_MM,COL_MM] [--threads N] [--device CPU]
//             [--warmup N] [--passes N] FRAME.pgm|FOLDER ...
//
// What a scanner does: verify the bundle (SHA256SUMS, schema version, backend, input contract), load the model
// from the verified bytes, then feed each frame from memory and read the mask. Writes DIR/<frame>.mask.pgm (0/255
// for two classes, else the class index per pixel) and DIR/frames.csv (per-frame class areas in pixels, in mm2
// with --pixel-spacing, and latency: infer_ms = the infer call alone, total_ms = the whole per-frame work: wrap
// the frame, set the tensor, infer, read the mask, count the areas). --passes N runs the cine N times and keeps the
// last pass: the first call on a new frame size pays OpenVINO's shape-specific preparation, which a scanner's
// cine (one size) pays once; the sample's frames all differ in size.
//
// Exit codes: 0 done; 2 bad usage or unreadable frame file; 3 bundle refused (tampered, newer schema, backend or
// task this host cannot run); 4 a frame outside the bundle's input contract (nothing is run); 5 OpenVINO error.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <openvino/openvino.hpp>

#include "bundle.hpp"
#include "pgm.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct FrameError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    fs::path bundle, out;
    std::vector<std::string> inputs;
    double row_mm = 0.0, col_mm = 0.0;  // pixel spacing; 0 = unknown
    int threads = 0;                    // 0 = OpenVINO's default
    int warmup = 1;
    int passes = 1;
    std::string device = "CPU";
};

const char* kUsage =
    "usage: usfm_host BUNDLE.usfm --out DIR [--pixel-spacing MM | ROW_MM,COL_MM] [--threads N] [--device CPU]\n"
    "                 [--warmup N] [--passes N] FRAME.pgm|FOLDER ...\n";

Options parse_args(int argc, char** argv) {
    Options o;
    std::vector<std::string> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
            return args[++i];
        };
        try {
            if (a == "--out") o.out = value();
            else if (a == "--threads") o.threads = std::stoi(value());
            else if (a == "--warmup") o.warmup = std::stoi(value());
            else if (a == "--passes") o.passes = std::stoi(value());
            else if (a == "--device") o.device = value();
            else if (a == "--pixel-spacing") {
                std::string v = value();
                std::size_t comma = v.find(',');
                o.row_mm = std::stod(v.substr(0, comma));
                o.col_mm = comma == std::string::npos ? o.row_mm : std::stod(v.substr(comma + 1));
                if (!(o.row_mm > 0.0 && o.col_mm > 0.0)) throw UsageError("--pixel-spacing must be positive");
            } else if (a == "-h" || a == "--help") throw UsageError("");
            else if (a.rfind("--", 0) == 0) throw UsageError("unknown option " + a);
            else if (o.bundle.empty()) o.bundle = a;
            else o.inputs.push_back(a);
        } catch (const std::logic_error&) {  // std::stoi / std::stod
            throw UsageError("bad value for " + a);
        }
    }
    if (o.bundle.empty() || o.out.empty() || o.inputs.empty()) throw UsageError("");
    if (o.passes < 1 || o.warmup < 0) throw UsageError("--passes must be >= 1 and --warmup >= 0");
    return o;
}

// The frames of the cine, read into memory before the loop (a scanner hands over buffers, not files).
std::vector<usfm::Frame> load_frames(const std::vector<std::string>& inputs) {
    std::vector<std::string> paths;
    for (const auto& in : inputs) {
        if (fs::is_directory(in)) {
            std::vector<std::string> found;
            for (const auto& e : fs::directory_iterator(in))
                if (e.path().extension() == ".pgm") found.push_back(e.path().string());
            std::sort(found.begin(), found.end());
            paths.insert(paths.end(), found.begin(), found.end());
        } else {
            paths.push_back(in);
        }
    }
    std::vector<usfm::Frame> frames;
    for (const auto& p : paths) {
        frames.push_back(usfm::read_pgm(p));
        frames.back().name = fs::path(p).stem().string();
    }
    if (frames.empty()) throw UsageError("no .pgm frames found");
    return frames;
}

// This host runs raw-frame segmentation bundles made for OpenVINO (IR), or for ONNX Runtime (their model.onnx
// is read by OpenVINO's ONNX frontend); everything else is refused with the reason.
void check_runnable(const usfm::Bundle& b) {
    if (b.backend == "tensorrt")
        throw usfm::BundleError("bundle is made for TensorRT (target '" + b.target + "'): build model.engine on the "
                                "device with its build_engine.sh and run it with TensorRT; this host runs openvino "
                                "bundles (and onnx bundles through OpenVINO's ONNX frontend)");
    if (b.backend == "openvino") {
        if (!b.has_file("openvino_xml") || !b.has_file("openvino_bin"))
            throw usfm::BundleError("openvino bundle without its files.openvino_xml / files.openvino_bin");
    } else if (b.backend == "onnxruntime") {
        if (!b.has_file("onnx")) throw usfm::BundleError("onnx bundle without its files.onnx");
    } else {
        throw usfm::BundleError("backend '" + b.backend + "' is unknown to this host (it runs openvino and onnx "
                                "bundles)");
    }
    if (!b.raw_frame)
        throw usfm::BundleError("bare bundle (input layout BCHW, normalised floats): this host feeds raw uint8 "
                                "frames; export without --bare");
    if (b.task != "seg")
        throw usfm::BundleError("task '" + b.task + "': this example host writes segmentation masks (task seg)");
    bool has_mask = std::any_of(b.outputs.begin(), b.outputs.end(), [](const auto& o) { return o.name == "mask"; });
    if (!has_mask) throw usfm::BundleError("seg bundle without a 'mask' output in usfm.json outputs");
    if (b.labels.empty()) throw usfm::BundleError("seg bundle without labels");
}

void check_frame(const usfm::Bundle& b, const usfm::Frame& f, int max_side) {
    std::string size = std::to_string(f.height) + "x" + std::to_string(f.width);
    if (std::min(f.height, f.width) < b.min_side)
        throw FrameError("frame '" + f.name + "' is " + size + "; this bundle needs sides of at least " +
                         std::to_string(b.min_side) + " px");
    if (std::max(f.height, f.width) > max_side)
        throw FrameError("frame '" + f.name + "' is " + size + ", larger than the bundle's maximum side " +
                         std::to_string(max_side) + " px: crop or downsample it");
    if (b.static_hw && (f.height != (*b.static_hw)[0] || f.width != (*b.static_hw)[1]))
        throw FrameError("frame '" + f.name + "' is " + size + " but this bundle's graph has the static size " +
                         std::to_string((*b.static_hw)[0]) + "x" + std::to_string((*b.static_hw)[1]) +
                         ": resize frames to it, or use a dynamic-shape bundle (target openvino or onnx)");
}

// [doc:load-model]
// The model comes from the bytes SHA256SUMS was checked on; nothing is read from disk again.
ov::CompiledModel compile_bundle(ov::Core& core, const usfm::Bundle& bundle, const std::string& device,
                                 int threads) {
    std::shared_ptr<ov::Model> model;
    if (bundle.backend == "openvino") {
        const std::vector<std::uint8_t>& xml = bundle.file("openvino_xml");
        const std::vector<std::uint8_t>& bin = bundle.file("openvino_bin");
        ov::Tensor weights(ov::element::u8, ov::Shape{bin.size()}, bin.data());  // wraps the bytes, no copy
        model = core.read_model(std::string(xml.begin(), xml.end()), weights);
    } else {  // an onnx bundle: OpenVINO's ONNX frontend reads the model from memory
        const std::vector<std::uint8_t>& onnx = bundle.file("onnx");
        model = core.read_model(std::string(onnx.begin(), onnx.end()), ov::Tensor());
    }
    // one frame per call: fix the batch at 1 (a dynamic batch makes the CPU plugin run the whole graph
    // dynamically, even after the in-graph resize has made the other dimensions static)
    ov::PartialShape shape = model->input().get_partial_shape();
    if (shape.rank().is_static() && shape.size() >= 2 && shape[0].is_dynamic()) {
        shape[0] = 1;
        model->reshape(shape);
    }
    ov::AnyMap config{ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
    if (bundle.precision == "fp32")  // else OpenVINO computes in bf16 on CPUs with AVX512-BF16 / AMX
        config.insert(ov::hint::inference_precision(ov::element::f32));
    if (threads > 0) config.insert(ov::inference_num_threads(threads));
    return core.compile_model(model, device, config);
}
// [doc:end]

struct FrameResult {
    std::vector<std::uint8_t> mask;  // class index per pixel
    std::vector<std::int64_t> areas;  // pixels per class
    double infer_ms = 0.0, total_ms = 0.0;
};

template <typename T>
void copy_mask(const ov::Tensor& t, FrameResult& r, std::size_t classes, const std::string& frame) {
    const T* src = t.data<const T>();
    for (std::size_t i = 0; i < r.mask.size(); ++i) {
        auto c = static_cast<std::int64_t>(src[i]);
        if (c < 0 || static_cast<std::size_t>(c) >= classes)
            throw std::runtime_error("frame '" + frame + "': mask holds class " + std::to_string(c) + " but the "
                                     "bundle has " + std::to_string(classes) + " labels");
        r.mask[i] = static_cast<std::uint8_t>(c);
        ++r.areas[static_cast<std::size_t>(c)];
    }
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    std::size_t n = v.size();
    return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

void write_outputs(const Options& o, const usfm::Bundle& b, const std::vector<usfm::Frame>& frames,
                   const std::vector<FrameResult>& results) {
    fs::create_directories(o.out);
    bool binary = b.labels.size() == 2;
    std::ofstream csv(o.out / "frames.csv");
    csv << "frame,height,width,infer_ms,total_ms";
    for (const auto& l : b.labels) csv << ",px_" << l;
    if (o.row_mm > 0.0)
        for (const auto& l : b.labels) csv << ",mm2_" << l;
    csv << "\n";
    for (std::size_t i = 0; i < frames.size(); ++i) {
        const usfm::Frame& f = frames[i];
        const FrameResult& r = results[i];
        std::vector<std::uint8_t> img = r.mask;
        if (binary)
            for (auto& v : img) v = v ? 255 : 0;
        usfm::write_pgm((o.out / (f.name + ".mask.pgm")).string(), f.height, f.width, img.data());
        char ms[64];
        std::snprintf(ms, sizeof ms, "%.3f,%.3f", r.infer_ms, r.total_ms);
        csv << f.name << "," << f.height << "," << f.width << "," << ms;
        for (auto a : r.areas) csv << "," << a;
        if (o.row_mm > 0.0)
            for (auto a : r.areas) {
                char mm2[32];
                std::snprintf(mm2, sizeof mm2, ",%.4f", static_cast<double>(a) * o.row_mm * o.col_mm);
                csv << mm2;
            }
        csv << "\n";
    }
    if (!csv) throw std::runtime_error("cannot write " + (o.out / "frames.csv").string());
}

int run(const Options& o) {
    // [doc:open]
    usfm::Bundle bundle = usfm::open_bundle(o.bundle);  // SHA256SUMS, schema version, contract; keep it alive
    check_runnable(bundle);                              // backend, task, raw-frame input, 'mask' output
    // [doc:end]
    int max_side = std::min(bundle.max_side, bundle.meta.at("preprocessing").value("max_side", bundle.max_side));
    std::vector<usfm::Frame> frames = load_frames(o.inputs);
    for (const auto& f : frames) check_frame(bundle, f, max_side);
    std::cerr << "usfm_host: bundle " << o.bundle.filename().string() << ": task " << bundle.task << ", "
              << bundle.labels.size() << " labels, backend " << bundle.backend << ", precision " << bundle.precision
              << ", input '" << bundle.input_name << "' uint8 (1,H,W)"
              << (bundle.static_hw ? " static" : " any size") << "; OpenVINO " << ov::get_openvino_version().buildNumber
              << "; " << frames.size() << " frames\n";
    if (bundle.backend == "onnxruntime")
        std::cerr << "usfm_host: note: a bundle made for ONNX Runtime; its model.onnx runs on OpenVINO's ONNX "
                     "frontend (the parity in usfm.json was measured on ONNX Runtime)\n";

    // [doc:request]
    ov::Core core;
    ov::CompiledModel compiled = compile_bundle(core, bundle, o.device, o.threads);
    ov::InferRequest request = compiled.create_infer_request();  // one per thread
    const ov::Output<const ov::Node> in_port = compiled.input(bundle.input_name);  // usfm.json input.tensor.name
    const ov::Output<const ov::Node> mask_port = compiled.output("mask");          // usfm.json outputs[].name
    // [doc:end]
    const std::size_t classes = bundle.labels.size();

    int wh = bundle.static_hw ? (*bundle.static_hw)[0] : bundle.img_size;
    int ww = bundle.static_hw ? (*bundle.static_hw)[1] : bundle.img_size;
    std::vector<std::uint8_t> blank(static_cast<std::size_t>(wh) * ww, 0);
    for (int i = 0; i < o.warmup; ++i) {  // as Engine.open: the first call pays for lazy initialisation
        request.set_tensor(in_port, ov::Tensor(ov::element::u8, ov::Shape{1, std::size_t(wh), std::size_t(ww)},
                                               blank.data()));
        request.infer();
    }

    // One frame: everything a scanner does per frame once the buffer is in memory (timed as total_ms).
    auto process = [&](const usfm::Frame& frame, FrameResult& r) {
        const std::size_t H = std::size_t(frame.height), W = std::size_t(frame.width);
        auto t0 = Clock::now();
        // [doc:infer]
        const ov::Tensor input(ov::element::u8, ov::Shape{1, H, W}, frame.pixels.data());  // read-only view
        request.set_tensor(in_port, input);  // of the frame's buffer: no copy
        auto t1 = Clock::now();
        request.infer();
        auto t2 = Clock::now();
        const ov::Tensor mask = request.get_tensor(mask_port);  // (1, H, W): class index per pixel
        // [doc:end]
        if (mask.get_size() != H * W)
            throw std::runtime_error("frame '" + frame.name + "': mask output has " + std::to_string(mask.get_size()) +
                                     " values, expected " + std::to_string(H * W));
        r.mask.resize(H * W);
        r.areas.assign(classes, 0);
        auto type = mask.get_element_type();
        if (type == ov::element::u8) copy_mask<std::uint8_t>(mask, r, classes, frame.name);
        else if (type == ov::element::i64) copy_mask<std::int64_t>(mask, r, classes, frame.name);
        else if (type == ov::element::i32) copy_mask<std::int32_t>(mask, r, classes, frame.name);
        else throw std::runtime_error("mask output has element type " + type.get_type_name());
        auto t3 = Clock::now();
        r.infer_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
        r.total_ms = std::chrono::duration<double, std::milli>(t3 - t0).count();
    };
    std::vector<FrameResult> results(frames.size());
    for (int pass = 0; pass < o.passes; ++pass)  // the last pass's masks and times are kept
        for (std::size_t i = 0; i < frames.size(); ++i) process(frames[i], results[i]);
    write_outputs(o, bundle, frames, results);

    std::vector<double> infer, total;
    for (const auto& r : results) {
        infer.push_back(r.infer_ms);
        total.push_back(r.total_ms);
    }
    double mi = median(infer), mt = median(total);
    char line[256];
    std::snprintf(line, sizeof line, "usfm_host: %zu frames: median infer %.2f ms, median per-frame total %.2f ms "
                  "(host work beyond infer: %.2f%% of infer)\n", frames.size(), mi, mt, 100.0 * (mt - mi) / mi);
    std::cerr << line << "usfm_host: wrote " << (o.out / "frames.csv").string() << " and " << frames.size()
              << " masks\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options opts;
    try {
        opts = parse_args(argc, argv);
    } catch (const UsageError& e) {
        if (*e.what()) std::cerr << "usfm_host: " << e.what() << "\n";
        std::cerr << kUsage;
        return 2;
    }
    try {
        return run(opts);
    } catch (const usfm::BundleError& e) {
        std::cerr << "usfm_host: bundle refused: " << e.what() << "\n";
        return 3;
    } catch (const FrameError& e) {
        std::cerr << "usfm_host: frame refused (nothing was run): " << e.what() << "\n";
        return 4;
    } catch (const ov::Exception& e) {
        std::cerr << "usfm_host: OpenVINO error: " << e.what() << "\n";
        return 5;
    } catch (const UsageError& e) {
        std::cerr << "usfm_host: " << e.what() << "\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "usfm_host: error: " << e.what() << "\n";
        return 2;
    }
}
