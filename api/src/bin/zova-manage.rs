//! `zova-manage`: the operator's tool; see `api::manage`.

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    api::manage::main()
}
