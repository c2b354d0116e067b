//! Builds the C++ shim over libtorch (csrc/torch_ext.cpp), gives the trainer binary an rpath to
//! the venv's libtorch (so it runs without LD_LIBRARY_PATH), keeps libtorch_cuda linked so CUDA
//! is visible on GPU machines, and puts the `libnccl.so` name that cudarc loads on the rpath
//! (the torch wheel ships only `libnccl.so.2`).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc/torch_ext.cpp");
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH").expect(
        "LIBTORCH must name the libtorch directory (.cargo/config.toml points it at the venv's torch; run scripts/setup)",
    ));
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cuda = lib.join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(&libtorch, cuda);
    let nccl = lib.join("../../nvidia/nccl/lib/libnccl.so.2");
    if let Ok(nccl) = nccl.canonicalize() {
        let links = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nccl");
        link_nccl(&links, &nccl);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", links.display());
    }
}

/// Compiles csrc/torch_ext.cpp against libtorch's headers (the ABI flag matches the torch wheel's),
/// with its CUDA half when libtorch has CUDA and the wheel's CUDA runtime headers are there.
fn build_shim(libtorch: &Path, cuda: bool) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .include(libtorch.join("include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("csrc/torch_ext.cpp");
    let cuda_include = libtorch.join("../nvidia/cu13/include");
    if cuda && ["cuda_runtime_api.h", "crt/host_config.h"].iter().all(|h| cuda_include.join(h).exists()) {
        build.define("TRAINER_WITH_CUDA", None).include(cuda_include);
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    build.compile("torch_ext");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn link_nccl(links: &Path, nccl: &Path) {
    std::fs::create_dir_all(links).expect("cannot create the NCCL link folder");
    let link = links.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(nccl, &link).expect("cannot link libnccl.so");
}
