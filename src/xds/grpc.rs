//! One bidirectional gRPC call at the framing level, over tonic's channel.
//!
//! tonic's `Streaming` reserves each incoming message's full length in its
//! receive buffer and never shrinks it: istiod's first response for 100k
//! workloads is tens of MB, and that much stayed allocated for the life of
//! the stream. Here the response body is read directly, each
//! length-prefixed message is decoded as soon as it is complete, and a
//! buffer grown for a large message is released after it.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{body::Body, transport::Channel, Code, Status};
use tower_service::Service;

/// gRPC message prefix: compressed flag (1 byte) + big-endian length (4).
const HEADER: usize = 5;

/// A receive buffer grown for a message larger than this is released
/// after it.
const KEEP: usize = 64 << 10;

fn encode<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(HEADER + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    m.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// The response side of an open call.
pub struct Call {
    body: Body,
    buf: BytesMut,
    max_message: usize,
}

/// Starts `path` on `channel`, sending `requests` as the request stream.
pub async fn call<M, S>(
    channel: &mut Channel,
    path: &'static str,
    authorization: Option<HeaderValue>,
    requests: S,
    max_message: usize,
) -> Result<Call, Status>
where
    M: Message + 'static,
    S: Stream<Item = M> + Send + 'static,
{
    let frames = requests.map(|m| Ok::<_, Infallible>(Frame::data(encode(&m))));
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(Body::new(StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    if let Some(a) = authorization {
        req.headers_mut().insert(header::AUTHORIZATION, a);
    }
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let resp = channel
        .call(req)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // A call refused up front answers with its status in the headers.
    if let Some(st) = Status::from_header_map(resp.headers()) {
        if st.code() != Code::Ok {
            return Err(st);
        }
    }
    if resp.status() != StatusCode::OK {
        return Err(Status::unknown(format!("HTTP status {}", resp.status())));
    }
    Ok(Call {
        body: resp.into_body(),
        buf: BytesMut::new(),
        max_message,
    })
}

impl Call {
    /// The next message, still encoded; None when the server ended the
    /// call with OK.
    pub async fn message(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(m) = self.decode_one()? {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.put(data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        return match Status::from_header_map(&trailers) {
                            Some(st) if st.code() == Code::Ok => Ok(None),
                            Some(st) => Err(st),
                            None => Err(Status::internal("trailers without grpc-status")),
                        };
                    }
                },
                Some(Err(st)) => return Err(st),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(Status::internal("stream ended inside a message")),
            }
        }
    }

    fn decode_one(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::internal(
                "compressed message, though no compression was offered",
            ));
        }
        let len = u32::from_be_bytes(self.buf[1..HEADER].try_into().expect("4 bytes")) as usize;
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "message of {len} bytes exceeds the limit of {}",
                self.max_message
            )));
        }
        if self.buf.len() < HEADER + len {
            // Grow once to the exact size rather than by doubling.
            self.buf.reserve(HEADER + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let m = self.buf.split_to(len).freeze();
        // The buffer was grown to hold this message and shares its memory
        // with it: what follows (usually nothing) moves to a small buffer,
        // so the memory goes when the caller drops the message.
        if len > KEEP {
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok(Some(m))
    }
}
