//! Stroke extraction as the app does it with OpenCV: grey (`cv2.COLOR_RGB2GRAY`), then Otsu's
//! threshold (`cv2.THRESH_BINARY + cv2.THRESH_OTSU`): above the threshold -> white paper,
//! otherwise black stroke.

/// `cv2.cvtColor(RGB2GRAY)` on u8: fixed-point 0.299 R + 0.587 G + 0.114 B, rounded.
pub fn gray(rgb: &[u8]) -> Vec<u8> {
    // OpenCV's coefficients scaled by 2^15 (imgproc color_rgb.simd.hpp, RGB2Gray<uchar>).
    const R: u32 = 9798;
    const G: u32 = 19235;
    const B: u32 = 3735;
    rgb.chunks_exact(3)
        .map(|p| ((p[0] as u32 * R + p[1] as u32 * G + p[2] as u32 * B + (1 << 14)) >> 15) as u8)
        .collect()
}

/// OpenCV's `getThreshVal_Otsu_8u`: the grey level maximising the between-class variance.
pub fn otsu_threshold(gray: &[u8]) -> u8 {
    let mut hist = [0u64; 256];
    for &v in gray {
        hist[v as usize] += 1;
    }
    let n = gray.len().max(1) as f64;
    let scale = 1.0 / n;
    let mu: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum::<f64>()
        * scale;
    let (mut mu1, mut q1) = (0f64, 0f64);
    let (mut max_sigma, mut max_val) = (0f64, 0u8);
    for (i, &c) in hist.iter().enumerate() {
        let p_i = c as f64 * scale;
        mu1 *= q1;
        q1 += p_i;
        let q2 = 1.0 - q1;
        if q1.min(q2) < f32::EPSILON as f64 || q1.max(q2) > 1.0 - f32::EPSILON as f64 {
            continue;
        }
        mu1 = (mu1 + i as f64 * p_i) / q1;
        let mu2 = (mu - q1 * mu1) / q2;
        let sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
        if sigma > max_sigma {
            max_sigma = sigma;
            max_val = i as u8;
        }
    }
    max_val
}

/// Grey levels to 0 (stroke) / 255 (paper) with Otsu's threshold; returns the threshold too.
pub fn binarize(gray: &[u8]) -> (Vec<u8>, u8) {
    let t = otsu_threshold(gray);
    (
        gray.iter().map(|&v| if v > t { 255 } else { 0 }).collect(),
        t,
    )
}

/// An 8-bit ink coverage for transparent output: Otsu splits paper from ink, and the grey
/// levels between the mean ink and the mean paper level map linearly to alpha 255..0, so the
/// paper is fully transparent, strokes opaque, and anti-aliased edges stay soft.
pub fn ink_alpha(gray: &[u8]) -> Vec<u8> {
    let t = otsu_threshold(gray);
    let mean = |keep: &dyn Fn(u8) -> bool| {
        let (s, n) = gray
            .iter()
            .filter(|&&v| keep(v))
            .fold((0u64, 0u64), |(s, n), &v| (s + v as u64, n + 1));
        (n > 0).then(|| s as f64 / n as f64)
    };
    let paper = mean(&|v| v > t).unwrap_or(255.0);
    let ink = mean(&|v| v <= t).unwrap_or(0.0).min(paper - 1.0);
    gray.iter()
        .map(|&g| {
            ((paper - g as f64) / (paper - ink) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect()
}
