//! The floor: the cheapest sidecar pair these interception rules allow — a plain TCP
//! relay in each pod (`pair --relay`, UID 1337, one single-threaded runtime like the
//! proxy's default): accept on 15001 and 15006, read the original destination, connect to
//! it, copy bytes both ways. No TLS, no HTTP, no metrics, no config. Whatever it costs
//! against direct is what the three TCP hops and the two wake-ups per message in each pod
//! cost on this machine, the part of any userspace sidecar's bill that no proxy code can
//! remove; the table puts it beside Remora so the targets can be read against it.

use std::net::SocketAddr;

use remora_proxy::{
    addr::{ClientAddr, LocalAddr},
    orig_dst::original_dst,
};
use tokio::net::{TcpListener, TcpStream};

/// Runs the relay until killed.
pub fn relay() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for port in [15001, 15006] {
            listeners.push(TcpListener::bind(("0.0.0.0", port)).await?);
        }
        for l in listeners {
            tokio::spawn(accept_loop(l));
        }
        std::future::pending::<anyhow::Result<()>>().await
    })
}

async fn accept_loop(listener: TcpListener) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = relay_one(client, ClientAddr(peer)).await {
                eprintln!("relay: {e}");
            }
        });
    }
}

async fn relay_one(mut client: TcpStream, peer: ClientAddr) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let local = LocalAddr(client.local_addr()?);
    let dst: SocketAddr = original_dst(&client, peer)?.0;
    anyhow::ensure!(dst != local.0, "connection to {dst} was not redirected");
    let mut upstream = TcpStream::connect(dst).await?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
