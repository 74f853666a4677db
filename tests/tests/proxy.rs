//! The fault proxy on its own, in front of a local echo server (no broker).

use std::net::SocketAddr;
use std::time::Duration;

use amqp_rebound_tests::proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(5);

/// An echo server; it stops with the runtime.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn roundtrip(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn forwards_both_ways_and_counts() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(roundtrip(&mut a, b"hello").await.expect("echo"), b"hello");
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    assert_eq!(roundtrip(&mut b, &big).await.expect("echo"), big);
    assert_eq!(
        (proxy.accepted(), proxy.refused(), proxy.active()),
        (2, 0, 2)
    );
    drop(a);
    wait_for("one connection to end", || proxy.active() == 1).await;
}

#[tokio::test]
async fn reset_all_sends_rst_to_open_connections_only() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let mut old = TcpStream::connect(proxy.addr()).await.expect("connect");
    roundtrip(&mut old, b"x").await.expect("echo");
    proxy.reset_all();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, old.read(&mut buf))
        .await
        .expect("the reset arrives");
    let error = read.expect_err("a reset, not EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    let mut new = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(roundtrip(&mut new, b"y").await.expect("echo"), b"y");
}

#[tokio::test]
async fn blackhole_existing_silences_old_connections_but_not_new_ones() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let mut old = TcpStream::connect(proxy.addr()).await.expect("connect");
    roundtrip(&mut old, b"x").await.expect("echo");
    proxy.blackhole_existing();
    old.write_all(b"lost").await.expect("the write is accepted");
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), old.read(&mut buf))
            .await
            .is_err(),
        "nothing comes back, and the connection stays open"
    );
    let mut new = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(roundtrip(&mut new, b"y").await.expect("echo"), b"y");
    assert_eq!(proxy.active(), 2);
}

#[tokio::test]
async fn blackhole_all_holds_data_until_lifted() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
    roundtrip(&mut a, b"x").await.expect("echo");
    proxy.blackhole_all(true);
    a.write_all(b"held").await.expect("write");
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.read_exact(&mut buf))
            .await
            .is_err()
    );
    proxy.blackhole_all(false);
    tokio::time::timeout(DEADLINE, a.read_exact(&mut buf))
        .await
        .expect("delivered once lifted")
        .expect("read");
    assert_eq!(&buf, b"held");
}

#[tokio::test]
async fn refuses_for_a_while_then_accepts() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    proxy.refuse_for(Duration::from_millis(300));
    let mut refused = TcpStream::connect(proxy.addr())
        .await
        .expect("the TCP accept");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, refused.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!((proxy.accepted(), proxy.refused()), (1, 1));
    tokio::time::sleep(Duration::from_millis(350)).await; // the refusal's length
    let mut ok = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(roundtrip(&mut ok, b"z").await.expect("echo"), b"z");
    proxy.refuse(true);
    let mut refused = TcpStream::connect(proxy.addr())
        .await
        .expect("the TCP accept");
    let read = tokio::time::timeout(DEADLINE, refused.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!((proxy.accepted(), proxy.refused()), (3, 2));
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let addr = proxy.addr();
    let mut a = TcpStream::connect(addr).await.expect("connect");
    roundtrip(&mut a, b"x").await.expect("echo");
    drop(proxy);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, a.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is gone"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_closes_the_client() {
    // port 1 on loopback: nothing listens there
    let proxy = FaultProxy::start("127.0.0.1:1".parse().expect("addr")).expect("proxy");
    let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, a.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_for("no active connection", || proxy.active() == 0).await;
}

#[tokio::test]
async fn close_all_ends_open_connections_in_order() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    let mut old = TcpStream::connect(proxy.addr()).await.expect("connect");
    roundtrip(&mut old, b"x").await.expect("echo");
    assert_eq!(proxy.close_all(), 1);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, old.read(&mut buf))
        .await
        .expect("the close arrives");
    assert_eq!(read.expect("EOF, not a reset"), 0);
    let mut new = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(roundtrip(&mut new, b"y").await.expect("echo"), b"y");
    wait_for("the closed connection to go", || proxy.active() == 1).await;
}

#[tokio::test]
async fn reset_and_close_one_pick_a_single_connection() {
    let proxy = FaultProxy::start(echo_server().await).expect("proxy");
    assert_eq!(proxy.reset(0), None, "nothing open");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        roundtrip(&mut s, b"x").await.expect("echo");
        streams.push(s);
    }
    assert_eq!(proxy.open().into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    // picks wrap around the open connections: 4 is the second of three
    assert_eq!(proxy.reset(4), Some(1));
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, streams[1].read(&mut buf))
        .await
        .expect("the reset arrives");
    assert_eq!(
        read.expect_err("a reset").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    wait_for("two open", || proxy.open().len() == 2).await;
    assert_eq!(proxy.close(0), Some(0));
    let read = tokio::time::timeout(DEADLINE, streams[0].read(&mut buf))
        .await
        .expect("the close arrives");
    assert_eq!(read.expect("EOF"), 0);
    assert_eq!(roundtrip(&mut streams[2], b"z").await.expect("echo"), b"z");
    wait_for("one open", || proxy.open().len() == 1).await;
}

#[tokio::test]
async fn inject_reaches_every_open_client() {
    // an upstream that accepts and stays silent: whatever a client reads came
    // from the proxy
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let proxy = FaultProxy::start(upstream).expect("proxy");
    let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
    wait_for("both forwarded", || proxy.open().len() == 2).await;
    let frame = FaultProxy::connection_method(61, &[]);
    assert_eq!(
        frame,
        [1, 0, 0, 0, 0, 0, 4, 0, 10, 0, 61, 0xCE],
        "connection.unblocked on channel 0"
    );
    assert_eq!(proxy.inject(&frame), 2);
    for client in [&mut a, &mut b] {
        let mut got = vec![0u8; frame.len()];
        tokio::time::timeout(DEADLINE, client.read_exact(&mut got))
            .await
            .expect("the injected bytes arrive")
            .expect("read");
        assert_eq!(got, frame);
    }
}
