//! Gives the trainer binary an rpath to the venv's libtorch (so it runs without
//! LD_LIBRARY_PATH), keeps libtorch_cuda linked so CUDA is visible on GPU machines, and puts
//! the `libnccl.so` name that cudarc loads on the rpath (the torch wheel ships only `libnccl.so.2`).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let nccl = lib.join("../../nvidia/nccl/lib/libnccl.so.2");
    if let Ok(nccl) = nccl.canonicalize() {
        let links = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nccl");
        link_nccl(&links, &nccl);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", links.display());
    }
}

fn link_nccl(links: &Path, nccl: &Path) {
    std::fs::create_dir_all(links).expect("cannot create the NCCL link folder");
    let link = links.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(nccl, &link).expect("cannot link libnccl.so");
}
