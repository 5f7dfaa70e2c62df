//! The `troupe` binary: allocator, logging, then the command line.

use clap::Parser;

// Every tensor op allocates its output; mimalloc keeps those large buffers instead of
// returning them to the OS each time (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = troupe::cli::Cli::parse();
    init_tracing();
    if let Err(error) = troupe::cli::run(cli) {
        eprintln!("error: {error}");
        std::process::exit(error.exit_code());
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let json = std::env::var("TROUPE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
