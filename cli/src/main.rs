//! The `troupe` binary: allocator, logging (and, with the `otel` feature, span export), then
//! the command line.

use clap::Parser;

// Every tensor op allocates its output; mimalloc keeps those large buffers instead of
// returning them to the OS each time (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = troupe::Cli::parse();
    // A command whose output goes to a pipe that closes early (`troupe cluster status | head`)
    // ends quietly, as other command-line tools do, instead of panicking on the write. The
    // long-running processes keep Rust's default (SIGPIPE ignored), and sockets never raise it.
    if !matches!(
        cli.command,
        troupe::Command::Node(_) | troupe::Command::Up(_)
    ) {
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let spans = init_tracing();
    let result = troupe::run(cli);
    // `troupe node` returns here after SIGINT or SIGTERM: the spans still queued go to the
    // collector before the process exits.
    spans.shutdown();
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(error.exit_code());
    }
}

/// Logs to stderr (`RUST_LOG`, default `warn`; `TROUPE_LOG_FORMAT=json`), and with the `otel`
/// feature exports spans when the `OTEL_*` environment names a collector.
fn init_tracing() -> SpanExport {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let json = std::env::var("TROUPE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = if json {
        log.json().boxed()
    } else {
        log.boxed()
    };
    let (spans, export) = SpanExport::from_env();
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(export)
        .init();
    spans.announce();
    spans
}

#[cfg(feature = "otel")]
use troupe_node::telemetry::Exporter as SpanExport;

/// Without the `otel` feature: no span export.
#[cfg(not(feature = "otel"))]
struct SpanExport;

#[cfg(not(feature = "otel"))]
impl SpanExport {
    fn from_env() -> (Self, tracing_subscriber::layer::Identity) {
        (Self, tracing_subscriber::layer::Identity::new())
    }

    fn announce(&self) {}

    fn shutdown(self) {}
}
