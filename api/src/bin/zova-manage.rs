//! `zova-manage`: the operator's tool; see `api::manage`.

fn main() -> std::process::ExitCode {
    api::manage::main()
}
