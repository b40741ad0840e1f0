//! `kith send-file` and `kith download`: progress bars on a terminal, JSON otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::api::client::Client;

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
    let id = id.to_owned();
    let direction = direction.to_owned();
    let result = client
        .events_until(|event: Value| {
            if event["type"] == "failed" && event["id"] == id.as_str() {
                bar.abandon_with_message(format!(
                    "failed: {}",
                    event["reason"].as_str().unwrap_or_default()
                ));
                return true;
            }
            if event["type"] != "progress"
                || event["id"] != id.as_str()
                || event["direction"] != direction.as_str()
            {
                return false;
            }
            let (done, total) = (
                event["done"].as_u64().unwrap_or(0),
                event["total"].as_u64().unwrap_or(0),
            );
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish();
                return true;
            }
            false
        })
        .await;
    result.context("following progress")
}

/// `kith send-file TO PATH [--json]`.
pub async fn send_file(client: &Client, to: &str, path: PathBuf, json: bool) -> Result<()> {
    let path =
        std::fs::canonicalize(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let sent: Value = client
        .post(
            "/v1/send-file",
            &json!({ "to": to, "path": path.to_string_lossy() }),
        )
        .await?;
    let id = sent["id"].as_str().unwrap_or_default().to_owned();
    if json {
        println!("{}", serde_json::to_string(&sent)?);
        return Ok(());
    }
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
    let body = json!({ "id": id, "to": to.map(|d| d.to_string_lossy().into_owned()) });
    let request = client.post::<Value>("/v1/download", &body);
    let view = if !json && std::io::stdout().is_terminal() {
        let (view, _) = tokio::join!(request, async {
            let _ = follow(client, id, "download", "downloading").await;
        });
        view?
    } else {
        request.await?
    };
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!("{}", view["path"].as_str().unwrap_or_default());
    }
    Ok(())
}
