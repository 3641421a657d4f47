//! Opaque TCP proxying: bytes copied both ways, half-close propagated (a FIN from one
//! side shuts down the write half towards the other, and the other direction keeps
//! flowing until it ends too).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    addr::Direction,
    metrics::{BytesLabels, Metrics, Static},
};

/// Copies between `client` and `upstream` until both directions are done. `prefix` (bytes
/// read from the client during detection) is sent upstream first. Byte counts go to the
/// metrics even when the copy ends with an error.
pub async fn proxy<C, U>(
    metrics: &Metrics,
    direction: Direction,
    client: &mut C,
    prefix: Bytes,
    upstream: &mut U,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !prefix.is_empty() {
        upstream.write_all(&prefix).await?;
    }
    let result = tokio::io::copy_bidirectional(client, upstream).await;
    let (from_client, to_client) = match &result {
        Ok((a, b)) => (*a + prefix.len() as u64, *b),
        Err(_) => (prefix.len() as u64, 0),
    };
    metrics
        .tcp_bytes
        .get_or_create(&BytesLabels {
            direction,
            flow: Static("from_client"),
        })
        .inc_by(from_client);
    metrics
        .tcp_bytes
        .get_or_create(&BytesLabels {
            direction,
            flow: Static("to_client"),
        })
        .inc_by(to_client);
    result.map(|_| (from_client, to_client))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let metrics = Metrics::new();
        let (mut app, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut server) = tokio::io::duplex(1024);
        let proxy_task = tokio::spawn(async move {
            proxy(
                &metrics,
                Direction::Outbound,
                &mut client_side,
                Bytes::from_static(b"pre:"),
                &mut upstream_side,
            )
            .await
            .expect("proxy")
        });
        app.write_all(b"request").await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"pre:request");
        // The server answers after the client's FIN: the reply still arrives.
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("close");
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.expect("read reply");
        assert_eq!(reply, b"reply");
        assert_eq!(proxy_task.await.expect("join"), (11, 5));
    }
}
