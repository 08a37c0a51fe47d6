//! Resumable model downloads.
//!
//! A model version arrives as chunks of its encoded `Model` message
//! (`ModelChunkRequest`/`ModelChunk`). With a state folder, the bytes go to
//! `model-v<version>-<hash>.part` as they arrive, so a download cut off by a dropped
//! connection (or a device restart) continues from the bytes already on disk. Nothing is used
//! until the whole message is in, decodes, and its parameters match the announced hash; a
//! part file that fails that check is deleted so the next attempt starts clean.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedge_core::ModelParams;
use fedge_core::codec::{self, MAX_MESSAGE_BYTES};
use fedge_core::params::ContentHash;
use fedge_core::wire::Message;

use thiserror::Error;

use crate::link::{ConnectError, Link};

/// Why a model download failed.
#[derive(Debug, Error)]
pub enum DownloadError {
    /// The connection failed or closed.
    #[error(transparent)]
    Link(#[from] ConnectError),
    /// The coordinator sent a model whose hash does not match.
    #[error("model version {version} failed verification: expected {expected}, got {got}")]
    BadModel {
        /// The version.
        version: u64,
        /// Hash announced.
        expected: String,
        /// Hash computed.
        got: String,
    },
    /// A download chunk made no sense.
    #[error("bad model chunk: {0}")]
    BadChunk(String),
    /// The state folder could not be written.
    #[error("state folder: {0}")]
    Storage(String),
}

/// Bytes asked for per chunk.
pub const CHUNK_BYTES: u32 = 1 << 20;

/// A verified model and how it was fetched.
#[derive(Debug)]
pub struct Download {
    /// The parameters (hash verified).
    pub params: ModelParams,
    /// Their hash.
    pub hash: ContentHash,
    /// Bytes already on disk when the download started (0: from scratch).
    pub resumed_from: u64,
    /// Bytes fetched over the network this time.
    pub fetched: u64,
    /// The verified encoded `Model` message, if it was assembled on disk (ready to become
    /// the device's `model.bin` with a rename).
    pub file: Option<PathBuf>,
}

fn part_prefix(version: u64) -> String {
    format!("model-v{version}-")
}

/// A part file `<prefix><id>.part` in `dir`, with the id in its name and its length.
fn find_part(dir: &Path, prefix: &str) -> Option<(PathBuf, String, u64)> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(hash) = name.strip_prefix(prefix).and_then(|r| r.strip_suffix(".part")) {
            let len = entry.metadata().ok()?.len();
            return Some((entry.path(), hash.to_string(), len));
        }
    }
    None
}

/// Removes part files of versions other than `keep`.
fn remove_other_parts(dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("model-v") && name.ends_with(".part") && !name.starts_with(&part_prefix(keep)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |e| DownloadError::Storage(format!("{}: {e}", path.display()))
}

/// One chunk as the coordinator answered it: what the bytes belong to (the content's hash, in
/// the part file's name), the whole download's length, and the bytes.
pub(crate) struct Chunk<I> {
    /// The content's identity.
    pub id: I,
    /// The whole download's length.
    pub total_len: u64,
    /// The chunk's bytes.
    pub bytes: Vec<u8>,
}

/// The bytes of a finished resumable download.
pub(crate) struct Fetched<I> {
    /// The content's identity, as its chunks announced it.
    pub id: I,
    /// All its bytes.
    pub bytes: Vec<u8>,
    /// Bytes already on disk when the download started (0: from scratch).
    pub resumed_from: u64,
    /// Bytes fetched over the network this time.
    pub fetched: u64,
    /// The part file they were assembled in, when there was a folder.
    pub file: Option<PathBuf>,
}

/// A resumable chunked download, written once for models and deployed blobs: `ask(offset)`
/// fetches the chunk at `offset`. With `dir`, the bytes go to `<prefix><id>.part` as they
/// arrive, and a part file of that prefix left by an earlier attempt is continued (or, when
/// it holds another content or more than `max_len` bytes, started again). Without `dir` the
/// bytes stay in memory. Nothing is verified here beyond the chunks' consistency: the caller
/// checks the bytes and removes the part file when it is done with it.
pub(crate) async fn fetch_resumable<I, E, F, Fut>(
    dir: Option<&Path>,
    prefix: &str,
    max_len: u64,
    mut ask: F,
) -> Result<Fetched<I>, E>
where
    I: Copy + PartialEq + std::fmt::Display,
    E: From<DownloadError>,
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Chunk<I>, E>>,
{
    let mut part = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io(d))?;
            find_part(d, prefix)
        }
        None => None,
    };
    if let Some((path, _, len)) = &part
        && *len > max_len
    {
        let _ = std::fs::remove_file(path);
        part = None;
    }
    let resumed_from = part.as_ref().map_or(0, |p| p.2);
    let mut memory = Vec::new();
    let mut offset = resumed_from;
    let mut fetched = 0u64;
    let mut announced: Option<(I, u64)> = None;
    loop {
        let Chunk { id, total_len, bytes: chunk } = ask(offset).await?;
        if total_len > max_len || offset + chunk.len() as u64 > total_len {
            return Err(DownloadError::BadChunk(format!("{} bytes at {offset} of {total_len}", chunk.len())).into());
        }
        if announced.is_some_and(|a| a != (id, total_len)) {
            return Err(DownloadError::BadChunk("the model changed during the download".into()).into());
        }
        announced = Some((id, total_len));
        if let Some((path, part_id, _)) = &part
            && *part_id != id.to_string()
        {
            // A part of other bytes under the same version number: start again.
            let _ = std::fs::remove_file(path);
            part = None;
            offset = 0;
            continue;
        }
        if let Some(d) = dir {
            let path = match &part {
                Some((p, _, _)) => p.clone(),
                None => {
                    let p = d.join(format!("{prefix}{id}.part"));
                    part = Some((p.clone(), id.to_string(), 0));
                    p
                }
            };
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            f.write_all(&chunk).map_err(io(&path))?;
        } else {
            memory.extend_from_slice(&chunk);
        }
        offset += chunk.len() as u64;
        fetched += chunk.len() as u64;
        if offset == total_len {
            break;
        }
        if chunk.is_empty() {
            return Err(DownloadError::BadChunk(format!("empty chunk at {offset} of {total_len}")).into());
        }
    }
    let (id, _) = announced.expect("at least one chunk arrived");
    let (bytes, file) = match &part {
        Some((path, _, _)) => (std::fs::read(path).map_err(io(path))?, Some(path.clone())),
        None => (memory, None),
    };
    Ok(Fetched { id, bytes, resumed_from, fetched, file })
}

/// Fetches model `version` in chunks, continuing a part file in `dir` if there is one.
pub async fn fetch_model(link: &Link, version: u64, dir: Option<&Path>) -> Result<Download, DownloadError> {
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(io(d))?;
        remove_other_parts(d, version);
    }
    let ask = |offset| async move {
        let request = Message::ModelChunkRequest { version, offset, max_len: CHUNK_BYTES };
        match link.request(&request).await? {
            Message::ModelChunk { version: v, hash, total_len, offset: o, bytes } if v == version && o == offset => {
                Ok(Chunk { id: hash, total_len, bytes })
            }
            Message::Error { code, message } => Err(ConnectError::Refused { code, message }.into()),
            _ => Err(ConnectError::Unexpected.into()),
        }
    };
    let Fetched { id: hash, bytes, resumed_from, fetched, file } =
        fetch_resumable::<_, DownloadError, _, _>(dir, &part_prefix(version), MAX_MESSAGE_BYTES as u64, ask).await?;
    let verified = match codec::decode(&bytes) {
        Ok(Message::Model { version: v, hash: h, params }) if v == version && h == hash => {
            let got = params.content_hash();
            if got == hash { Ok(params) } else { Err(got.to_string()) }
        }
        Ok(_) => Err("not the model announced".into()),
        Err(e) => Err(e.to_string()),
    };
    match verified {
        Ok(params) => Ok(Download { params, hash, resumed_from, fetched, file }),
        Err(got) => {
            if let Some(f) = &file {
                let _ = std::fs::remove_file(f);
            }
            Err(DownloadError::BadModel { version, expected: hash.to_string(), got })
        }
    }
}
