//! `troupe models push DIR --name NAME`: hash the directory, ask the node whether it already
//! has this version, then stream the files in 1 MiB chunks with a progress bar.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use troupe_models::artifact::Manifest;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::push_model_chunk::Part;
use troupe_proto::v1::{FileChunk, PushModelChunk, PushModelHeader, ReadRequest};

use super::models::PushArgs;
use super::remote::{channel, print_json};
use crate::error::CliError;

const CHUNK_BYTES: usize = 1 << 20;
/// A push moves the whole model; its deadline is generous.
const PUSH_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Serialize)]
struct PushView {
    name: String,
    version: String,
    digest: String,
    size_bytes: u64,
    revision: u64,
    changed: bool,
    bytes_sent: u64,
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>8} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("push");
    bar
}

pub async fn push(args: PushArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    let manifest = tokio::task::spawn_blocking(move || Manifest::of_dir(&dir))
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))??;
    let digest = manifest.digest();
    let version = args
        .version
        .clone()
        .unwrap_or_else(|| digest[..12].to_owned());
    let mut client = AdminClient::new(channel(&args.addr, PUSH_TIMEOUT).await?)
        .max_decoding_message_size(usize::MAX);

    // Same bytes already recorded: nothing to send (the node re-checks on its side).
    let listed = client
        .list_models(ReadRequest {
            stale: false,
            min_revision: 0,
        })
        .await?
        .into_inner();
    let known = listed
        .models
        .iter()
        .find(|m| m.name == args.name && m.version == version);
    if let Some(known) = known {
        if known.digest != digest {
            return Err(CliError::Rpc {
                code: tonic::Code::AlreadyExists,
                message: format!(
                    "model '{}' version '{version}' is already registered with digest {}, these files have digest {digest}: push them as a new version",
                    args.name, known.digest
                ),
            });
        }
    }

    let header = PushModelHeader {
        name: args.name.clone(),
        version: version.clone(),
        files: troupe_node::server::push::manifest_entries(&manifest),
        format: args.format.clone().unwrap_or_default(),
        request_id: String::new(),
        precision: args.precision.clone().unwrap_or_default(),
    };
    let bar = progress(manifest.total_bytes(), args.quiet);
    let (sender, receiver) = tokio::sync::mpsc::channel::<PushModelChunk>(4);
    let dir = args.dir.clone();
    let files = manifest.files.clone();
    let reader_bar = bar.clone();
    let reader = tokio::spawn(async move {
        let header = PushModelChunk {
            part: Some(Part::Header(header)),
        };
        if sender.send(header).await.is_err() {
            return Ok(0u64);
        }
        let mut sent = 0u64;
        for (index, file) in files.iter().enumerate() {
            let path = dir.join(&file.path);
            let mut handle =
                tokio::fs::File::open(&path)
                    .await
                    .map_err(|source| CliError::Input {
                        path: path.clone(),
                        source,
                    })?;
            let mut offset = 0u64;
            loop {
                let mut data = vec![0u8; CHUNK_BYTES];
                let read = handle
                    .read(&mut data)
                    .await
                    .map_err(|source| CliError::Input {
                        path: path.clone(),
                        source,
                    })?;
                if read == 0 {
                    break;
                }
                data.truncate(read);
                let chunk = PushModelChunk {
                    part: Some(Part::Chunk(FileChunk {
                        file: index as u32,
                        offset,
                        data,
                    })),
                };
                // The node answered early (an error, or it already had the version).
                if sender.send(chunk).await.is_err() {
                    return Ok(sent);
                }
                offset += read as u64;
                sent += read as u64;
                reader_bar.inc(read as u64);
            }
        }
        Ok::<u64, CliError>(sent)
    });
    let reply = client
        .push_model(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await;
    let sent = reader
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))??;
    bar.finish_and_clear();
    let reply = reply?.into_inner();
    let view = PushView {
        name: args.name,
        version: reply.version,
        digest: reply.digest,
        size_bytes: reply.size_bytes,
        revision: reply.revision,
        changed: reply.changed,
        bytes_sent: sent,
    };
    if args.json {
        return print_json(&view);
    }
    println!(
        "{} {} version {} ({} bytes, digest {}) at revision {}",
        if view.changed { "pushed" } else { "unchanged:" },
        view.name,
        view.version,
        view.size_bytes,
        &view.digest[..16],
        view.revision
    );
    Ok(())
}
