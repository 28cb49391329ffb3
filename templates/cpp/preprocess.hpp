// edgebuild preprocessing in C++: the same steps, with the same integer arithmetic, as
// preprocess.py (copied into infer.py) running on Pillow:
//
//   decode -> colour mode (transparent pixels composited over white; 16-bit grey scaled
//   to 8 bits with rounding) -> resize (Pillow's BILINEAR: a separable triangle filter
//   whose support grows with the downscale factor, 22-bit fixed-point coefficients,
//   rounding to uint8 after each pass) -> x/255 -> (x - mean) / std -> float32 CHW.
//
// Exact for PNG (8/16-bit grey, grey+alpha, RGB, RGBA, palette with or without
// transparency), BMP, PGM/PPM. JPEG is decoded by stb_image, whose IDCT and chroma
// upsampling differ slightly from libjpeg's, and EXIF orientation is not applied: expect
// small differences on JPEGs. No parameter of the model is compiled into this file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "stb_image.h"

namespace edgebuild {

struct PreprocessParams {
    int height = 0;
    int width = 0;
    std::string color;   // rgb | bgr | grayscale
    std::string resize;  // stretch | letterbox | center-crop
    std::vector<float> mean;
    std::vector<float> std;
};

// An 8-bit image with 1 (L) or 3 (RGB) interleaved channels.
struct Image8 {
    int width = 0;
    int height = 0;
    int channels = 0;
    std::vector<uint8_t> px;
    uint8_t *row(int y) { return px.data() + static_cast<size_t>(y) * width * channels; }
    const uint8_t *row(int y) const { return px.data() + static_cast<size_t>(y) * width * channels; }
};

static const long long kMaxPixels = 50000000LL;  // same limit as the build's data loader

namespace detail {

// PNG colour type from the IHDR chunk, or -1 when the file is not a PNG.
inline int png_color_type(const std::string &path) {
    unsigned char head[26];
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) return -1;
    size_t n = std::fread(head, 1, sizeof head, f);
    std::fclose(f);
    static const unsigned char sig[8] = {137, 80, 78, 71, 13, 10, 26, 10};
    if (n < sizeof head) return -1;
    for (int i = 0; i < 8; i++)
        if (head[i] != sig[i]) return -1;
    return head[25];
}

// Pillow's Image.alpha_composite of (r, g, b, a) over opaque white (AlphaComposite.c).
inline uint8_t over_white(uint32_t c, uint32_t a) {
    if (a == 0) return 255;
    const uint32_t kBits = 7;
    uint32_t blend = 255u * (255u - a);
    uint32_t outa255 = a * 255u + blend;
    uint32_t coef1 = a * 255u * 255u * (1u << kBits) / outa255;
    uint32_t coef2 = 255u * (1u << kBits) - coef1;
    uint32_t tmp = c * coef1 + 255u * coef2 + (0x80u << kBits);
    return static_cast<uint8_t>((((tmp >> 8) + tmp) >> 8) >> kBits);
}

// Pillow's RGB -> L (Convert.c, L24).
inline uint8_t luma(uint32_t r, uint32_t g, uint32_t b) {
    return static_cast<uint8_t>((r * 19595u + g * 38470u + b * 7471u + 0x8000u) >> 16);
}

struct Coeffs {
    int ksize = 0;
    std::vector<int> bounds;   // (min, count) per output pixel
    std::vector<int32_t> kk;   // fixed-point weights, ksize per output pixel
};

const int kPrecisionBits = 32 - 8 - 2;

// Resample.c precompute_coeffs + normalize_coeffs_8bpc, BILINEAR filter, box (0, in_size).
inline Coeffs precompute(int in_size, int out_size) {
    Coeffs c;
    double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.bounds.assign(static_cast<size_t>(out_size) * 2, 0);
    c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
    std::vector<double> k(c.ksize);
    for (int xx = 0; xx < out_size; xx++) {
        double center = 0.0 + (xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        int x = 0;
        for (; x < xmax; x++) {
            double t = (x + xmin - center + 0.5) * ss;
            if (t < 0.0) t = -t;
            double w = t < 1.0 ? 1.0 - t : 0.0;
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < c.ksize; x++) k[x] = 0.0;
        for (x = 0; x < c.ksize; x++) {
            double v = k[x] * (1 << kPrecisionBits);
            c.kk[static_cast<size_t>(xx) * c.ksize + x] = static_cast<int32_t>(k[x] < 0 ? -0.5 + v : 0.5 + v);
        }
        c.bounds[xx * 2] = xmin;
        c.bounds[xx * 2 + 1] = xmax;
    }
    return c;
}

inline uint8_t clip8(int32_t v) {
    int32_t s = v >> kPrecisionBits;  // arithmetic shift, as in Pillow's lookup table
    return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

}  // namespace detail

// edgebuild.preprocess.bilinear: Pillow's BILINEAR resize as two explicit passes (width, then height),
// 8-bit rounding between them, for modes L and RGB.
inline Image8 resize_bilinear(const Image8 &in, int width, int height) {
    if (in.width == width && in.height == height) return in;
    const int ch = in.channels;
    Image8 cur = in;
    if (width != in.width) {
        detail::Coeffs c = detail::precompute(in.width, width);
        Image8 out;
        out.width = width;
        out.height = cur.height;
        out.channels = ch;
        out.px.assign(static_cast<size_t>(width) * cur.height * ch, 0);
        for (int y = 0; y < cur.height; y++) {
            const uint8_t *src = cur.row(y);
            uint8_t *dst = out.row(y);
            for (int xx = 0; xx < width; xx++) {
                int xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1];
                const int32_t *k = &c.kk[static_cast<size_t>(xx) * c.ksize];
                for (int b = 0; b < ch; b++) {
                    int32_t ss = 1 << (detail::kPrecisionBits - 1);
                    for (int x = 0; x < xmax; x++) ss += src[(x + xmin) * ch + b] * k[x];
                    dst[xx * ch + b] = detail::clip8(ss);
                }
            }
        }
        cur = std::move(out);
    }
    if (height != in.height) {
        detail::Coeffs c = detail::precompute(in.height, height);
        Image8 out;
        out.width = cur.width;
        out.height = height;
        out.channels = ch;
        out.px.assign(static_cast<size_t>(cur.width) * height * ch, 0);
        for (int yy = 0; yy < height; yy++) {
            int ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1];
            const int32_t *k = &c.kk[static_cast<size_t>(yy) * c.ksize];
            uint8_t *dst = out.row(yy);
            for (int xx = 0; xx < cur.width * ch; xx++) {
                int32_t ss = 1 << (detail::kPrecisionBits - 1);
                for (int y = 0; y < ymax; y++) ss += cur.row(y + ymin)[xx] * k[y];
                dst[xx] = detail::clip8(ss);
            }
        }
        cur = std::move(out);
    }
    return cur;
}

// Decode a file to 8-bit L (grayscale) or RGB, like preprocess.to_mode.
inline Image8 load_as(const std::string &path, bool grayscale) {
    int w = 0, h = 0, n = 0;
    if (!stbi_info(path.c_str(), &w, &h, &n))
        throw std::runtime_error("cannot read image " + path + ": " + (stbi_failure_reason() ? stbi_failure_reason() : "unknown format"));
    if (static_cast<long long>(w) * h > kMaxPixels)
        throw std::runtime_error("image " + path + " has more than 50000000 pixels");
    const int ctype = detail::png_color_type(path);
    // PNG grey/RGB with a tRNS colour key: Pillow keeps "L"/"RGB" (no compositing); stb adds alpha.
    const bool keyed_alpha = (ctype == 0 || ctype == 2);
    Image8 img;
    img.width = w;
    img.height = h;
    std::vector<uint8_t> buf;  // interleaved, n channels
    if (stbi_is_16_bit(path.c_str()) && (ctype == 0 || (ctype < 0 && n == 1))) {
        stbi_us *p = stbi_load_16(path.c_str(), &w, &h, &n, 0);
        if (!p) throw std::runtime_error("cannot decode image " + path + ": " + (stbi_failure_reason() ? stbi_failure_reason() : "?"));
        buf.resize(static_cast<size_t>(w) * h);
        for (size_t i = 0; i < buf.size(); i++) {
            uint32_t v = p[i * n];
            buf[i] = static_cast<uint8_t>((v * 2u + 257u) / 514u);  // round(v / 65535 * 255)
        }
        stbi_image_free(p);
        n = 1;
    } else {
        stbi_uc *p = stbi_load(path.c_str(), &w, &h, &n, 0);
        if (!p) throw std::runtime_error("cannot decode image " + path + ": " + (stbi_failure_reason() ? stbi_failure_reason() : "?"));
        int keep = (keyed_alpha && (n == 2 || n == 4)) ? n - 1 : n;
        buf.resize(static_cast<size_t>(w) * h * keep);
        for (size_t i = 0; i < static_cast<size_t>(w) * h; i++)
            for (int b = 0; b < keep; b++) buf[i * keep + b] = p[i * n + b];
        stbi_image_free(p);
        n = keep;
    }
    const size_t count = static_cast<size_t>(w) * h;
    if (n == 2 || n == 4) {  // composite over white -> RGB
        std::vector<uint8_t> rgb(count * 3);
        for (size_t i = 0; i < count; i++) {
            uint32_t a = buf[i * n + n - 1];
            for (int b = 0; b < 3; b++) rgb[i * 3 + b] = detail::over_white(buf[i * n + (n == 2 ? 0 : b)], a);
        }
        buf.swap(rgb);
        n = 3;
    }
    if (grayscale) {
        img.channels = 1;
        if (n == 1) {
            img.px = std::move(buf);
        } else {
            img.px.resize(count);
            for (size_t i = 0; i < count; i++) img.px[i] = detail::luma(buf[i * 3], buf[i * 3 + 1], buf[i * 3 + 2]);
        }
    } else {
        img.channels = 3;
        if (n == 3) {
            img.px = std::move(buf);
        } else {
            img.px.resize(count * 3);
            for (size_t i = 0; i < count; i++) img.px[i * 3] = img.px[i * 3 + 1] = img.px[i * 3 + 2] = buf[i];
        }
    }
    return img;
}

// Python's round() for the non-negative values used here: half to even.
inline int round_half_even(double v) { return static_cast<int>(std::nearbyint(v)); }

// preprocess.resize: stretch | letterbox | center-crop.
inline Image8 resize_mode(const Image8 &img, int height, int width, const std::string &mode) {
    const int w0 = img.width, h0 = img.height;
    if (mode == "stretch") return resize_bilinear(img, width, height);
    if (mode == "letterbox") {
        double scale = std::fmin(static_cast<double>(width) / w0, static_cast<double>(height) / h0);
        int nw = std::max(1, round_half_even(w0 * scale)), nh = std::max(1, round_half_even(h0 * scale));
        Image8 inner = resize_bilinear(img, nw, nh);
        Image8 canvas;
        canvas.width = width;
        canvas.height = height;
        canvas.channels = img.channels;
        canvas.px.assign(static_cast<size_t>(width) * height * img.channels, 0);
        int left = (width - nw) / 2, top = (height - nh) / 2;  // both >= 0
        for (int y = 0; y < nh; y++) {
            int ty = y + top;
            if (ty < 0 || ty >= height) continue;
            for (int x = 0; x < nw; x++) {
                int tx = x + left;
                if (tx < 0 || tx >= width) continue;
                for (int b = 0; b < img.channels; b++) canvas.row(ty)[tx * img.channels + b] = inner.row(y)[x * img.channels + b];
            }
        }
        return canvas;
    }
    if (mode == "center-crop") {
        double scale = std::fmax(static_cast<double>(width) / w0, static_cast<double>(height) / h0);
        int nw = std::max(width, round_half_even(w0 * scale)), nh = std::max(height, round_half_even(h0 * scale));
        Image8 big = resize_bilinear(img, nw, nh);
        int left = (nw - width) / 2, top = (nh - height) / 2;
        Image8 out;
        out.width = width;
        out.height = height;
        out.channels = img.channels;
        out.px.resize(static_cast<size_t>(width) * height * img.channels);
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width * img.channels; x++) out.row(y)[x] = big.row(y + top)[left * img.channels + x];
        return out;
    }
    throw std::runtime_error("unknown resize mode: " + mode);
}

// One image file -> float32 CHW tensor, normalised as (x/255 - mean) / std.
inline std::vector<float> load_image(const std::string &path, const PreprocessParams &p) {
    const bool gray = p.color == "grayscale";
    if (!gray && p.color != "rgb" && p.color != "bgr") throw std::runtime_error("unknown color mode: " + p.color);
    Image8 img = resize_mode(load_as(path, gray), p.height, p.width, p.resize);
    const int ch = img.channels;
    const size_t plane = static_cast<size_t>(p.height) * p.width;
    std::vector<float> out(plane * ch);
    for (int c = 0; c < ch; c++) {
        const int src = (p.color == "bgr") ? ch - 1 - c : c;
        const float mean = p.mean.size() == 1 ? p.mean[0] : p.mean.at(c);
        const float sd = p.std.size() == 1 ? p.std[0] : p.std.at(c);
        for (int y = 0; y < p.height; y++)
            for (int x = 0; x < p.width; x++) {
                float v = static_cast<float>(img.row(y)[x * ch + src]) / 255.0f;  // float32 arithmetic, as numpy
                float d = v - mean;
                out[c * plane + static_cast<size_t>(y) * p.width + x] = d / sd;
            }
    }
    return out;
}

}  // namespace edgebuild
