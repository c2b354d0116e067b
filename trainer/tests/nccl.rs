//! The NCCL backend in the default build: libnccl loads at run time through the link on the binary's rpath; the GPU round trip of every collective passes on a GPU and fails clearly without one.
mod common;

use common::TRAINER;
use std::process::Command;

#[test]
fn nccl_loads_at_run_time_without_cuda_at_build_time() {
    let output = Command::new(TRAINER).arg("env").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let nccl = stdout.lines().find_map(|l| l.strip_prefix("nccl: ")).expect("an nccl line");
    let parts: Vec<u32> = nccl.split('.').map(|p| p.parse().unwrap_or_else(|_| panic!("version: {nccl}"))).collect();
    assert!(parts.len() == 3 && parts[0] == 2 && parts[1] >= 18, "NCCL 2.18 or newer: {nccl}");
    assert!(stdout.contains("mpi: Open MPI"), "{stdout}");
}

#[test]
fn the_gpu_round_trip_passes_on_a_gpu_and_fails_clearly_without_one() {
    let output = Command::new(TRAINER).arg("check-nccl").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!stderr.contains("panicked"), "{stderr}");
    if tch::Cuda::is_available() {
        assert!(output.status.success(), "{stdout}{stderr}");
        assert_eq!(stdout.lines().filter(|l| l.ends_with(": ok")).count(), 20, "{stdout}");
    } else {
        assert!(!output.status.success());
        let clear = ["cannot load the NVIDIA driver's libcuda.so.1", "cuDeviceGet failed"];
        assert!(clear.iter().any(|m| stderr.contains(m)), "{stderr}");
    }
}
