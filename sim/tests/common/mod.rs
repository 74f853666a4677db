//! A small harness: a clock, a broker, a transport and a `LocalPool`, stepped in
//! virtual time.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use amqp_rebound_core::transport::ConnectOptions;
use amqp_rebound_core::{
    Channel, ChannelEvent, Connection, ConnectionEvent, Endpoint, QueueDecl, Transport,
    TransportError,
};
use amqp_rebound_sim::{
    BrokerConfig, SimBroker, SimChannel, SimConnection, SimTransport, VirtualClock,
};
use futures::executor::LocalPool;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

pub const HOST: &str = "rabbit";
pub const URI: &str = "amqp://guest:guest@rabbit:5672/%2f";

pub struct Harness {
    pub clock: VirtualClock,
    pub broker: SimBroker,
    pub transport: SimTransport,
    pub pool: LocalPool,
}

/// A connection and its event stream.
pub struct Conn {
    pub conn: SimConnection,
    pub events: BoxStream<'static, ConnectionEvent>,
}

/// A channel and its event stream.
pub struct Chan {
    pub chan: SimChannel,
    pub events: BoxStream<'static, ChannelEvent>,
}

impl Harness {
    pub fn new(seed: u64) -> Harness {
        Harness::with_config(BrokerConfig::default().with_seed(seed))
    }

    pub fn with_config(config: BrokerConfig) -> Harness {
        let clock = VirtualClock::new();
        let broker = SimBroker::new(clock.clone(), config).with_host(HOST);
        let transport = broker.transport();
        Harness {
            clock,
            broker,
            transport,
            pool: LocalPool::new(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.clock.elapsed()
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Drives `fut` to completion, stepping the clock one deadline at a time.
    /// Panics if it is still pending after an hour of virtual time.
    pub fn block_on<F: Future>(&mut self, fut: F) -> F::Output {
        self.try_block_on(fut, Duration::from_secs(3600))
            .expect("the future stalled")
    }

    /// Drives `fut` for at most `limit` of virtual time; `None` if still pending.
    pub fn try_block_on<F: Future>(&mut self, fut: F, limit: Duration) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let deadline = self.clock.now() + limit;
        loop {
            self.pool.run_until_stalled();
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return Some(v);
            }
            self.pool.run_until_stalled();
            match self.clock.next_deadline() {
                Some(t) if t <= deadline => {
                    self.clock.advance_to(t);
                }
                _ => {
                    self.clock.advance_to(deadline);
                    self.pool.run_until_stalled();
                    return match fut.as_mut().poll(&mut cx) {
                        Poll::Ready(v) => Some(v),
                        Poll::Pending => None,
                    };
                }
            }
        }
    }

    /// Lets `duration` of virtual time pass.
    pub fn advance(&mut self, duration: Duration) {
        let pool = &mut self.pool;
        self.clock.run_for(duration, || pool.run_until_stalled());
    }

    pub fn connect(&mut self) -> Conn {
        self.connect_to(URI).expect("connect")
    }

    pub fn connect_to(&mut self, uri: &str) -> Result<Conn, TransportError> {
        let endpoint = Endpoint::parse(uri).expect("valid uri");
        let transport = self.transport.clone();
        let conn = self.block_on(async move {
            transport
                .connect(&endpoint, &ConnectOptions::named("test"))
                .await
        })?;
        let events = conn.events();
        Ok(Conn { conn, events })
    }

    pub fn channel(&mut self, conn: &Conn) -> Chan {
        let chan = self
            .block_on(conn.conn.open_channel())
            .expect("open channel");
        let events = chan.events();
        Chan { chan, events }
    }

    /// A connection with one channel in confirm mode.
    pub fn confirm_channel(&mut self) -> (Conn, Chan) {
        let conn = self.connect();
        let chan = self.channel(&conn);
        self.block_on(chan.chan.confirm_select())
            .expect("confirm.select");
        (conn, chan)
    }

    pub fn declare(&mut self, chan: &Chan, decl: QueueDecl) -> String {
        self.block_on(chan.chan.declare_queue(&decl))
            .expect("declare queue")
            .name
    }
}

/// Every event available now (the stream is not waited on).
pub fn drain<T>(stream: &mut BoxStream<'static, T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(Some(item)) = stream.next().now_or_never() {
        out.push(item);
    }
    out
}

/// Whether the stream has ended.
pub fn ended<T>(stream: &mut BoxStream<'static, T>) -> bool {
    matches!(stream.next().now_or_never(), Some(None))
}

pub fn deliveries(events: &[ChannelEvent]) -> Vec<amqp_rebound_core::Delivery> {
    events
        .iter()
        .filter_map(|e| match e {
            ChannelEvent::Delivery(d) => Some((**d).clone()),
            _ => None,
        })
        .collect()
}

pub fn acks(events: &[ChannelEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            ChannelEvent::Ack { delivery_tag, .. } => Some(*delivery_tag),
            _ => None,
        })
        .collect()
}

pub fn code(err: &TransportError) -> Option<u16> {
    err.reply_code()
}

pub fn closed_code(events: &[ChannelEvent]) -> Option<u16> {
    events.iter().find_map(|e| match e {
        ChannelEvent::Closed(err) => err.reply_code(),
        _ => None,
    })
}
