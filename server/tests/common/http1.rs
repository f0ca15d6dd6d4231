//! A small raw HTTP/1.1 client for tests: one request per connection, the response body read
//! piece by piece (HTTP chunks, or reads for other framings) or as SSE events. Drop the
//! [`Response`] to close the connection (e.g. mid-stream). Reads have no timeout of their own:
//! callers bound them (`tokio::time::timeout`), or use [`status_of`].

use std::io;
use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest status line + headers, and largest body `body()` reads.
const MAX_HEAD: u64 = 64 * 1024;
const MAX_BODY: usize = 16 << 20;

enum Framing {
    Chunked,
    Length(u64),
    ToEof,
    Done,
}

pub struct Response {
    pub status: u16,
    /// Names lowercase, in order.
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    framing: Framing,
    sse: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends one request (adds `host`, `content-length` and `connection: close` unless given).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    if !has("content-length") && !has("transfer-encoding") {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if !has("connection") {
        head.push_str("connection: close\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut reader = BufReader::new(stream);
    let s = reader.get_mut();
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;

    let mut head_left = MAX_HEAD;
    let status_line = read_line(&mut reader, &mut head_left).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut reader, &mut head_left).await?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let framing = if method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || (100..200).contains(&status)
    {
        Framing::Done
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        Framing::Chunked
    } else if let Some(n) = get("content-length") {
        let n = n.parse().map_err(|_| bad("bad content-length"))?;
        if n == 0 {
            Framing::Done
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::ToEof
    };
    Ok(Response {
        status,
        headers,
        reader,
        framing,
        sse: Vec::new(),
    })
}

/// `POST path` with a JSON body.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> io::Result<Response> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(addr, "POST", path, &all, body.to_string().as_bytes()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    send(addr, "GET", path, &[], b"").await
}

/// One CRLF-terminated line without its terminator, charged to `left`.
async fn read_line(reader: &mut BufReader<TcpStream>, left: &mut u64) -> io::Result<String> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(*left)
        .read_until(b'\n', &mut buf)
        .await?;
    *left -= n as u64;
    if !buf.ends_with(b"\n") {
        return Err(if n == 0 || *left > 0 {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
        } else {
            bad("line too long")
        });
    }
    buf.pop();
    if buf.ends_with(b"\r") {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| bad("line not UTF-8"))
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The next piece of the body (one HTTP chunk when chunked); `None` at its end.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.framing {
            Framing::Done => Ok(None),
            Framing::Chunked => {
                let mut left = MAX_HEAD;
                let line = read_line(&mut self.reader, &mut left).await?;
                let size = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(&mut self.reader, &mut left).await?.is_empty() {}
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                if size > MAX_BODY {
                    return Err(bad("chunk too large"));
                }
                let mut data = vec![0; size];
                self.reader.read_exact(&mut data).await?;
                let crlf = read_line(&mut self.reader, &mut left).await?;
                if !crlf.is_empty() {
                    return Err(bad("chunk not followed by CRLF"));
                }
                Ok(Some(data))
            }
            Framing::Length(n) => {
                let mut data = vec![0; n.min(64 * 1024) as usize];
                let got = self.reader.read(&mut data).await?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body shorter than content-length",
                    ));
                }
                data.truncate(got);
                let rest = n - got as u64;
                self.framing = if rest == 0 {
                    Framing::Done
                } else {
                    Framing::Length(rest)
                };
                Ok(Some(data))
            }
            Framing::ToEof => {
                let mut data = vec![0; 64 * 1024];
                let got = self.reader.read(&mut data).await?;
                if got == 0 {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                data.truncate(got);
                Ok(Some(data))
            }
        }
    }

    /// The rest of the body (at most 16 MiB).
    pub async fn body(mut self) -> io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.sse);
        while let Some(piece) = self.next_chunk().await? {
            out.extend_from_slice(&piece);
            if out.len() > MAX_BODY {
                return Err(bad("body too large"));
            }
        }
        Ok(out)
    }

    pub async fn text(self) -> io::Result<String> {
        String::from_utf8(self.body().await?).map_err(|_| bad("body not UTF-8"))
    }

    pub async fn json(self) -> io::Result<Value> {
        serde_json::from_slice(&self.body().await?).map_err(|e| bad(e.to_string()))
    }

    /// The `data:` of the next server-sent event (several `data:` lines joined by `\n`),
    /// whatever the chunking; `None` at the end of the body.
    pub async fn next_event(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = find_event_end(&self.sse) {
                let raw: Vec<u8> = self.sse.drain(..end.0 + end.1).collect();
                let text =
                    String::from_utf8(raw[..end.0].to_vec()).map_err(|_| bad("event not UTF-8"))?;
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or a field-only event
                }
                return Ok(Some(data.join("\n")));
            }
            match self.next_chunk().await? {
                Some(piece) => {
                    self.sse.extend_from_slice(&piece);
                    if self.sse.len() > MAX_BODY {
                        return Err(bad("event too large"));
                    }
                }
                None if self.sse.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => return Err(bad("body ended inside an event")),
            }
        }
    }
}

/// Where the first event of `buf` ends: (its length, the blank line's length).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}
/// The status `GET path` answers within `limit`, if any.
pub async fn status_of(addr: SocketAddr, path: &str, limit: std::time::Duration) -> Option<u16> {
    match tokio::time::timeout(limit, get(addr, path)).await {
        Ok(Ok(r)) => Some(r.status),
        _ => None,
    }
}
