//! `kith send-file` and `kith download`: progress bars on a terminal, JSON otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::api::client::Client;
use crate::api::files::{DownloadBody, SendFileBody};
use crate::core::NodeEvent;

fn bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Follows progress events for `id` in `direction` until `done == total`.
async fn follow(client: &Client, id: &str, direction: &str, label: &str) -> Result<()> {
    let bar = bar(label);
    let result = client
        .events_until(|event: Value| match serde_json::from_value(event) {
            Ok(NodeEvent::Failed { id: failed, reason }) if failed == id => {
                bar.abandon_with_message(format!("failed: {reason}"));
                true
            }
            Ok(NodeEvent::Progress {
                id: of,
                direction: way,
                done,
                total,
            }) if of == id && way == direction => {
                bar.set_length(total);
                bar.set_position(done);
                if done >= total {
                    bar.finish();
                    return true;
                }
                false
            }
            // Other events, and any this version does not know.
            _ => false,
        })
        .await;
    result.context("following progress")
}

/// `kith send-file TO PATH [--json]`.
pub async fn send_file(client: &Client, to: &str, path: PathBuf, json: bool) -> Result<()> {
    let path =
        std::fs::canonicalize(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let body = SendFileBody {
        to: to.to_owned(),
        path: PathBuf::from(path.to_string_lossy().into_owned()),
    };
    let answer = client.send_file(&body).await?;
    if json {
        println!("{}", serde_json::to_string(answer.json())?);
        return Ok(());
    }
    let id = answer.decode()?.id;
    println!("{id}");
    if std::io::stdout().is_terminal() {
        follow(client, &id, "upload", "uploading").await?;
    }
    Ok(())
}

/// `kith download MESSAGE_ID [--to DIR] [--json]`.
pub async fn download(client: &Client, id: &str, to: Option<PathBuf>, json: bool) -> Result<()> {
    let to = to
        .map(|d| {
            std::fs::create_dir_all(&d)?;
            std::fs::canonicalize(&d)
        })
        .transpose()
        .context("the --to directory")?;
    let body = DownloadBody {
        id: id.to_owned(),
        to: to.map(|d| PathBuf::from(d.to_string_lossy().into_owned())),
    };
    let request = client.download(&body);
    let answer = if !json && std::io::stdout().is_terminal() {
        let (answer, _) = tokio::join!(request, async {
            let _ = follow(client, id, "download", "downloading").await;
        });
        answer?
    } else {
        request.await?
    };
    if json {
        println!("{}", serde_json::to_string(answer.json())?);
    } else {
        println!("{}", answer.decode()?.path.unwrap_or_default());
    }
    Ok(())
}
