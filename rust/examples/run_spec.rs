//! Run a VM from a JSON spec file: `cargo run --release --example run_spec -- spec.json`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: run_spec SPEC.json");
    let spec = std::fs::read_to_string(&path).expect("cannot read spec");
    match dvmm::vm::run_vm(&spec) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
