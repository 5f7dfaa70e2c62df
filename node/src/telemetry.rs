//! Span export over OTLP/gRPC (the `otel` cargo feature), configured by the standard `OTEL_*`
//! environment: the collector's address, the resource (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`), the sampler (`OTEL_TRACES_SAMPLER[_ARG]`) and the batching
//! (`OTEL_BSP_*`) are read by the OpenTelemetry SDK and its OTLP exporter themselves.
//!
//! - Nothing is exported unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set (no guessing `localhost:4317`). A collector that is
//!   absent or failing never stops a node: the exporter connects lazily, drops what it cannot
//!   send, warns at most once a minute, and says so when exporting works again.
//! - A request's span joins the trace of its W3C trace context: the server records the
//!   trace id (the client's `traceparent`'s, or a new one), its own span id and the caller's
//!   span id as the span's `trace_id`, `span_id` and `parent_id` fields before anything
//!   starts the span, and the exported span carries exactly those ids. A request forwarded on
//!   carries this node's span id as its parent, so the collector holds one trace across both
//!   nodes, the second node's span a child of the first's.
//! - Which spans go out: `TROUPE_OTEL_FILTER` (an `EnvFilter` directive, default
//!   `troupe_node::server=info`, the gRPC handlers), independent of `RUST_LOG`.
//!
//! [`Exporter::from_env`] builds the exporter and its tracing layer; [`Exporter::shutdown`]
//! flushes the spans still queued, and `main` calls it when the command returns.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, Key, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// Which spans are exported: an `EnvFilter` directive.
pub const FILTER_ENV: &str = "TROUPE_OTEL_FILTER";
const DEFAULT_FILTER: &str = "troupe_node::server=info";
/// The span fields holding the request's W3C trace id (32 hex digits), this node's span id
/// for it and the caller's span id (16 hex digits each).
const TRACE_ID_FIELD: &str = "trace_id";
const SPAN_ID_FIELD: &str = "span_id";
const PARENT_ID_FIELD: &str = "parent_id";
/// Recorded `false` when the caller's trace flags say it is not sampled.
const SAMPLED_FIELD: &str = "sampled";
/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
const DEFAULT_SERVICE_NAME: &str = "troupe";
/// How long exiting waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning per this long while exports keep failing.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The OTLP span exporter of this process, or why there is none.
pub struct Exporter {
    running: Option<Running>,
    /// What [`Exporter::announce`] logs, and whether it is a problem.
    status: String,
    problem: bool,
}

struct Running {
    provider: SdkTracerProvider,
    /// Drives the gRPC channel; the SDK's batch thread hands it the exports.
    runtime: tokio::runtime::Runtime,
}

impl Exporter {
    /// The exporter the `OTEL_*` environment asks for, and the tracing layer that feeds it
    /// (`None` when not exporting).
    pub fn from_env<S>() -> (Self, Option<impl Layer<S>>)
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = match wanted(env) {
            Ok(endpoint) => endpoint,
            Err((status, problem)) => {
                let off = Self {
                    running: None,
                    status,
                    problem,
                };
                return (off, None);
            }
        };
        let (filter, mut status) = match env(FILTER_ENV) {
            None => (EnvFilter::new(DEFAULT_FILTER), String::new()),
            Some(directive) => match EnvFilter::builder().parse(&directive) {
                Ok(filter) => (filter, String::new()),
                Err(error) => (
                    EnvFilter::new(DEFAULT_FILTER),
                    format!("; {FILTER_ENV}={directive:?} is not a filter ({error}), exporting {DEFAULT_FILTER}"),
                ),
            },
        };
        match start() {
            Ok((running, tracer, service)) => {
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    // The span starts when it closes (or gets a child), after the handler has
                    // recorded its trace id; see RequestTracer.
                    .with_context_activation(false)
                    .with_filter(filter);
                let problem = !status.is_empty();
                status = format!(
                    "exporting spans over OTLP/gRPC to {endpoint} as service.name {service}{status}"
                );
                let on = Self {
                    running: Some(running),
                    status,
                    problem,
                };
                (on, Some(layer))
            }
            Err(error) => {
                let off = Self {
                    running: None,
                    status: format!("not exporting spans: the OTLP exporter for {endpoint} could not be set up: {error}"),
                    problem: true,
                };
                (off, None)
            }
        }
    }

    /// Logs whether spans are exported, and where (once tracing is set up).
    pub fn announce(&self) {
        if self.problem {
            tracing::warn!("{}", self.status);
        } else if self.running.is_some() {
            tracing::info!("{}", self.status);
        } else {
            tracing::debug!("{}", self.status);
        }
    }

    /// Sends the spans still queued (waiting at most a few seconds for the collector), then
    /// stops the exporter.
    pub fn shutdown(self) {
        let Some(running) = self.running else {
            return;
        };
        if let Err(error) = running.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "the last spans may not have reached the OTLP collector");
        }
        running.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The endpoint to export to, or why not (and whether that is a problem worth a warning).
fn wanted(env: impl Fn(&str) -> Option<String>) -> Result<String, (String, bool)> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Err(("not exporting spans: OTEL_SDK_DISABLED=true".into(), false));
    }
    if let Some(exporters) = env("OTEL_TRACES_EXPORTER") {
        let names: Vec<&str> = exporters.split(',').map(str::trim).collect();
        if names.iter().all(|n| n.eq_ignore_ascii_case("none")) {
            return Err((
                "not exporting spans: OTEL_TRACES_EXPORTER=none".into(),
                false,
            ));
        }
        if !names.iter().any(|n| n.eq_ignore_ascii_case("otlp")) {
            return Err((
                format!("not exporting spans: OTEL_TRACES_EXPORTER={exporters:?}, but this troupe exports only otlp"),
                true,
            ));
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = env(name) {
            if protocol.trim() != "grpc" {
                return Err((
                    format!("not exporting spans: {name}={protocol:?}, but this troupe exports OTLP over grpc only (the collector's gRPC port, usually 4317)"),
                    true,
                ));
            }
            break;
        }
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .ok_or_else(|| {
            (
                "not exporting spans: set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://localhost:4317) to export them".into(),
                false,
            )
        })
}

/// The OTLP exporter behind a batch processor, the tracer for the layer, and the service name.
fn start() -> Result<(Running, RequestTracer, String), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime for it: {e}"))?;
    // The tonic channel spawns its connection task on the runtime it is built in; it connects
    // on first use, so an absent collector costs nothing here.
    let exporter = {
        let _runtime = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| e.to_string())?
    };
    let service_name = Key::from_static_str("service.name");
    let mut resource = Resource::builder().build();
    let detected = resource.get(&service_name);
    if detected.is_none_or(|name| name.as_str().starts_with("unknown_service")) {
        resource = Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build();
    }
    let service = resource
        .get(&service_name)
        .map(|name| name.as_str().into_owned())
        .unwrap_or_default();
    // The sampler (OTEL_TRACES_SAMPLER) and the batching (OTEL_BSP_*) come from the SDK's own
    // reading of the environment.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Logged::new(exporter))
        .with_id_generator(Ids::default())
        .with_resource(resource)
        .build();
    let scope = InstrumentationScope::builder("troupe")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracer = RequestTracer(provider.tracer_with_scope(scope));
    Ok((Running { provider, runtime }, tracer, service))
}

thread_local! {
    /// The ids the next span built on this thread gets (see [`RequestTracer`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except the ones [`RequestTracer`] asks for.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .take()
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID.take().unwrap_or_else(|| self.0.new_span_id())
    }
}

/// The SDK's tracer, except for a request's span: a span without a local parent whose
/// `trace_id` and `span_id` fields hold the request's W3C trace context (see
/// `forward::TraceContext`) is exported with exactly those ids, as a server span whose parent
/// is the remote span in its `parent_id` field (the caller's, or the forwarding node's).
/// So one request's spans on two nodes are one tree in the collector: client, node 1, node 2.
#[derive(Clone, Debug)]
struct RequestTracer(SdkTracer);

impl opentelemetry::trace::Tracer for RequestTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, mut builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        let has_parent = parent_cx.span().span_context().is_valid();
        let Some(ids) = (!has_parent).then(|| RequestIds::of(&builder)).flatten() else {
            return self.0.build_with_context(builder, parent_cx);
        };
        builder.span_kind.get_or_insert(SpanKind::Server);
        NEXT_SPAN_ID.set(Some(ids.span));
        let span = match ids.parent {
            Some(parent) => {
                let remote =
                    SpanContext::new(ids.trace, parent, ids.flags, true, TraceState::default());
                let parent_cx = Context::new().with_remote_span_context(remote);
                self.0.build_with_context(builder, &parent_cx)
            }
            None => {
                NEXT_TRACE_ID.set(Some(ids.trace));
                self.0.build_with_context(builder, parent_cx)
            }
        };
        // Unused when the SDK did not build the span (sampled out before, shut down).
        NEXT_TRACE_ID.set(None);
        NEXT_SPAN_ID.set(None);
        span
    }
}

/// A request span's ids, from its fields.
struct RequestIds {
    trace: TraceId,
    span: SpanId,
    parent: Option<SpanId>,
    flags: TraceFlags,
}

impl RequestIds {
    /// The valid ids in the span's `trace_id`, `span_id` and `parent_id` fields; `None` unless
    /// it has at least the first two.
    fn of(builder: &SpanBuilder) -> Option<Self> {
        let attributes = builder.attributes.as_ref()?;
        let field = |name: &str, digits: usize| {
            let attribute = attributes.iter().find(|kv| kv.key.as_str() == name)?;
            let Value::String(hex) = &attribute.value else {
                return None;
            };
            let hex = hex.as_str();
            (hex.len() == digits).then(|| hex.to_owned())
        };
        let trace = TraceId::from_hex(&field(TRACE_ID_FIELD, 32)?).ok()?;
        let span = SpanId::from_hex(&field(SPAN_ID_FIELD, 16)?).ok()?;
        let parent = field(PARENT_ID_FIELD, 16).and_then(|hex| SpanId::from_hex(&hex).ok());
        let parent = parent.filter(|id| *id != SpanId::INVALID);
        let unsampled = attributes
            .iter()
            .any(|kv| kv.key.as_str() == SAMPLED_FIELD && kv.value == Value::Bool(false));
        let flags = if unsampled {
            TraceFlags::NOT_SAMPLED
        } else {
            TraceFlags::SAMPLED
        };
        (trace != TraceId::INVALID && span != SpanId::INVALID).then_some(Self {
            trace,
            span,
            parent,
            flags,
        })
    }
}

/// An exporter that logs its failures, rate-limited: the SDK's own logs are off (its
/// `internal-logs` feature), so nothing else repeats them.
#[derive(Debug)]
struct Logged<E> {
    inner: E,
    failures: Mutex<Failures>,
}

#[derive(Debug, Default)]
struct Failures {
    /// Failed batches and their spans since the last success.
    batches: u64,
    spans: u64,
    warned: Option<Instant>,
}

impl<E> Logged<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failures: Mutex::new(Failures::default()),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(()) if failures.batches > 0 => {
                tracing::info!(
                    failed_batches = failures.batches,
                    dropped_spans = failures.spans,
                    "exporting spans to the OTLP collector works again"
                );
                *failures = Failures::default();
            }
            Ok(()) => {}
            Err(error) => {
                failures.batches += 1;
                failures.spans += spans;
                tracing::debug!(%error, spans, "OTLP span export failed");
                let now = Instant::now();
                if failures
                    .warned
                    .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
                {
                    failures.warned = Some(now);
                    tracing::warn!(
                        %error,
                        failed_batches = failures.batches,
                        dropped_spans = failures.spans,
                        "cannot export spans to the OTLP collector; dropping them and serving on (warning again in a minute if it keeps failing)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
