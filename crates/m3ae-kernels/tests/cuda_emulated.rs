//! The CUDA kernels' logic on the CPU: builds `tests/cuda_emulator/emulate.cpp` (a small SIMT
//! emulator that runs every kernel of `src/fused/cuda/kernels.cu` with one OS thread per CUDA
//! thread, using the launch geometry of `src/fused/cuda/mod.rs`) with the system C++ compiler
//! and checks its verdict: attention (separate and packed layouts, every padding pattern, large
//! scores), LayerNorm and GELU, forward and backward, and the text head (loss, accuracy and the
//! gradients of hidden, weight and bias on M3AE's weightings, rows and all rows of weight 0,
//! vocabularies not a multiple of the tile and of several tiles per chunk, two row tiles, very
//! large logits, arg-max ties inside a tile, across tiles and chunks, NaN rows and words; top-k
//! with ties, NaN, `k` from 1 to beyond `V` and repeated rows), against a double-precision
//! reference.
//! Needs a C++20 compiler (`$CXX`, else `c++`); without one the test fails, naming the compiler.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_reference_under_the_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::env::temp_dir().join(format!("m3ae-cuda-emulate-{}", std::process::id()));
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-I"])
        .arg(root.join("src/fused/cuda"))
        .arg(root.join("tests/cuda_emulator/emulate.cpp"))
        .arg("-o")
        .arg(&out)
        .output();
    let build = build.unwrap_or_else(|e| {
        panic!("this test needs a C++20 compiler: `{cxx}` could not be run ({e}); set $CXX")
    });
    assert!(
        build.status.success(),
        "{cxx} could not build the emulator:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&out).output().expect("run the emulator");
    let _ = std::fs::remove_file(&out);
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(
        run.status.success(),
        "CUDA kernels failed under the emulator:\n{report}"
    );
    assert!(report.contains("0 failure(s)"), "{report}");
    // every kernel was exercised
    for what in [
        "attention separate",
        "attention packed",
        "layer_norm",
        "gelu",
        "text_head masked-only",
        "text_head all rows of weight 0",
        "text_head ties-v4250",
        "text_head NaN",
        "text_top_k ties",
        "text_top_k NaN",
        "text_top_k chunks",
    ] {
        assert!(report.contains(what), "{what} not checked:\n{report}");
    }
}
