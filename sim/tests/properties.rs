//! Random workloads with random faults: the broker never panics, conserves
//! messages, never sees an unknown delivery tag the client did not invent, lets
//! consumers drain every queue once the faults end, and replays bit for bit from its
//! seed.
//!
//! A failure prints the minimal step list and broker seed; `REBOUND_SEED=<u64>`
//! changes the seed of the case generator.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use amqp_rebound_core::transport::ConnectOptions;
use amqp_rebound_core::{
    Channel, ChannelEvent, Connection, ConnectionEvent, ConsumeOptions, Endpoint, ExchangeDecl,
    ExchangeKind, FieldTable, Message, Properties, QueueDecl, Transport,
};
use amqp_rebound_sim::{
    BrokerConfig, ConfirmMode, SimBroker, SimChannel, SimConnection, VirtualClock,
};
use futures::StreamExt;
use futures::executor::LocalPool;
use futures::future::{Either, select};
use futures::task::LocalSpawnExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const HOSTS: [&str; 2] = ["rabbit-a", "rabbit-b"];
const CONNS: usize = 2;
const CHANS: usize = 2;
const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
const EXCHANGES: [&str; 5] = ["", "amq.direct", "amq.fanout", "amq.topic", "ex.t"];
const KEYS: [&str; 6] = ["q0", "q1", "a.b", "a.c", "x", "amq.gen-nope"];
const PATTERNS: [&str; 5] = ["q0", "a.*", "a.#", "#", "x"];

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    /// `odd` redeclares with other flags (406).
    Declare {
        chan: usize,
        queue: usize,
        odd: bool,
        exclusive: bool,
        auto_delete: bool,
    },
    DeclareServerNamed {
        chan: usize,
    },
    DeclareExchange {
        chan: usize,
        durable: bool,
    },
    DeleteQueue {
        chan: usize,
        queue: usize,
    },
    Bind {
        chan: usize,
        queue: usize,
        exchange: usize,
        pattern: usize,
    },
    Publish {
        chan: usize,
        exchange: usize,
        key: usize,
        mandatory: bool,
        persistent: bool,
        count: usize,
    },
    Consume {
        chan: usize,
        queue: usize,
        prefetch: u16,
        no_ack: bool,
    },
    Cancel {
        chan: usize,
    },
    Ack {
        chan: usize,
        pick: usize,
        multiple: bool,
    },
    Nack {
        chan: usize,
        pick: usize,
        multiple: bool,
        requeue: bool,
    },
    BogusAck {
        chan: usize,
    },
    CloseChannel {
        chan: usize,
    },
    CloseConnection {
        conn: usize,
    },
    Kill {
        conn: usize,
    },
    Restart {
        downtime_ms: u64,
    },
    Partition {
        host: usize,
    },
    Heal {
        host: usize,
    },
    Refuse {
        host: usize,
        ms: u64,
    },
    Block {
        conn: usize,
        on: bool,
    },
    Alarm {
        on: bool,
    },
    Confirms {
        mode: u8,
    },
    BrokerCancel {
        chan: usize,
    },
    BrokerCloseChannel {
        chan: usize,
        code: u16,
    },
    AdminDeleteQueue {
        queue: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let chan = 0..CONNS * CHANS;
    // The last index is the newest server-named queue.
    let queue = 0..QUEUES.len() + 1;
    prop_oneof![
        6 => prop_oneof![3 => 0u64..20, 1 => 0u64..3000].prop_map(Step::Advance),
        3 => (chan.clone(), queue.clone(), prop::bool::weighted(0.1), prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(chan, queue, odd, exclusive, auto_delete)| Step::Declare { chan, queue, odd, exclusive, auto_delete }),
        1 => chan.clone().prop_map(|chan| Step::DeclareServerNamed { chan }),
        1 => (chan.clone(), any::<bool>()).prop_map(|(chan, durable)| Step::DeclareExchange { chan, durable }),
        1 => (chan.clone(), queue.clone()).prop_map(|(chan, queue)| Step::DeleteQueue { chan, queue }),
        // Binding to the default exchange (403) is left to the unit tests.
        3 => (chan.clone(), queue.clone(), 1..EXCHANGES.len(), 0..PATTERNS.len())
            .prop_map(|(chan, queue, exchange, pattern)| Step::Bind { chan, queue, exchange, pattern }),
        20 => (chan.clone(), 0..EXCHANGES.len(), 0..KEYS.len(), any::<bool>(), any::<bool>(), 1usize..5)
            .prop_map(|(chan, exchange, key, mandatory, persistent, count)| Step::Publish { chan, exchange, key, mandatory, persistent, count }),
        6 => (chan.clone(), queue.clone(), 0u16..4, prop::bool::weighted(0.2))
            .prop_map(|(chan, queue, prefetch, no_ack)| Step::Consume { chan, queue, prefetch, no_ack }),
        1 => chan.clone().prop_map(|chan| Step::Cancel { chan }),
        10 => (chan.clone(), any::<usize>(), any::<bool>()).prop_map(|(chan, pick, multiple)| Step::Ack { chan, pick, multiple }),
        3 => (chan.clone(), any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(chan, pick, multiple, requeue)| Step::Nack { chan, pick, multiple, requeue }),
        1 => chan.clone().prop_map(|chan| Step::BogusAck { chan }),
        1 => chan.clone().prop_map(|chan| Step::CloseChannel { chan }),
        1 => (0..CONNS).prop_map(|conn| Step::CloseConnection { conn }),
        1 => (0..CONNS).prop_map(|conn| Step::Kill { conn }),
        1 => (0u64..3000).prop_map(|downtime_ms| Step::Restart { downtime_ms }),
        1 => (0..HOSTS.len()).prop_map(|host| Step::Partition { host }),
        2 => (0..HOSTS.len()).prop_map(|host| Step::Heal { host }),
        1 => (0..HOSTS.len(), 0u64..5000).prop_map(|(host, ms)| Step::Refuse { host, ms }),
        1 => (0..CONNS, any::<bool>()).prop_map(|(conn, on)| Step::Block { conn, on }),
        1 => any::<bool>().prop_map(|on| Step::Alarm { on }),
        1 => (0u8..4).prop_map(|mode| Step::Confirms { mode }),
        1 => chan.clone().prop_map(|chan| Step::BrokerCancel { chan }),
        1 => (chan, prop::sample::select(vec![406u16, 404, 541])).prop_map(|(chan, code)| Step::BrokerCloseChannel { chan, code }),
        1 => queue.prop_map(|queue| Step::AdminDeleteQueue { queue }),
    ]
}

/// What the client side of one channel slot knows.
#[derive(Default)]
struct ChanSlot {
    chan: Option<Rc<SimChannel>>,
    opening: bool,
    /// Delivery tags received and not yet settled (ackable ones only).
    unsettled: Vec<u64>,
    consumers: Vec<String>,
    confirm_tags: Vec<u64>,
}

#[derive(Default)]
struct ConnSlot {
    conn: Option<Rc<SimConnection>>,
    connecting: bool,
}

struct World {
    clock: VirtualClock,
    broker: SimBroker,
    pool: LocalPool,
    conns: Vec<Rc<RefCell<ConnSlot>>>,
    chans: Vec<Rc<RefCell<ChanSlot>>>,
    server_named: Rc<RefCell<Vec<String>>>,
    log: Rc<RefCell<Vec<String>>>,
    bogus_acks: u64,
    next_consumer: u64,
}

fn stamp(clock: &VirtualClock, line: String) -> String {
    let t = clock.elapsed();
    format!("[{:>4}.{:03}] {line}", t.as_secs(), t.subsec_millis())
}

impl World {
    fn new(seed: u64) -> World {
        let clock = VirtualClock::new();
        let config = BrokerConfig::default().with_seed(seed).with_trace(true);
        let broker = SimBroker::new(clock.clone(), config);
        for host in HOSTS {
            broker.add_host(host);
        }
        World {
            clock,
            broker,
            pool: LocalPool::new(),
            conns: (0..CONNS).map(|_| Rc::default()).collect(),
            chans: (0..CONNS * CHANS).map(|_| Rc::default()).collect(),
            server_named: Rc::default(),
            log: Rc::default(),
            bogus_acks: 0,
            next_consumer: 0,
        }
    }

    fn spawn(&mut self, fut: impl std::future::Future<Output = ()> + 'static) {
        self.pool.spawner().spawn_local(fut).expect("spawn");
    }

    /// Re-dials dead connections and reopens dead channels, in the background.
    fn repair(&mut self) {
        for i in 0..CONNS {
            let slot = self.conns[i].clone();
            let dead = {
                let s = slot.borrow();
                !s.connecting && s.conn.as_ref().is_none_or(|c| c.is_closed())
            };
            if dead {
                slot.borrow_mut().connecting = true;
                let transport = self.broker.transport();
                let clock = self.clock.clone();
                let log = self.log.clone();
                let uri = format!("amqp://guest:guest@{}", HOSTS[i % HOSTS.len()]);
                self.spawn(async move {
                    let endpoint = Endpoint::parse(&uri).expect("uri");
                    let options = ConnectOptions::named(format!("slot{i}"));
                    let dial = transport.connect(&endpoint, &options);
                    let timeout = clock.sleep(Duration::from_secs(5));
                    let result = match select(Box::pin(dial), timeout).await {
                        Either::Left((r, _)) => Some(r),
                        Either::Right(_) => None,
                    };
                    slot.borrow_mut().connecting = false;
                    let conn = match result {
                        Some(Ok(conn)) => conn,
                        Some(Err(err)) => {
                            let line = stamp(&clock, format!("slot{i}: dial failed: {err}"));
                            log.borrow_mut().push(line);
                            return;
                        }
                        None => {
                            let line = stamp(&clock, format!("slot{i}: dial timed out"));
                            log.borrow_mut().push(line);
                            return;
                        }
                    };
                    let line = stamp(&clock, format!("slot{i}: connected {}", conn.id()));
                    log.borrow_mut().push(line);
                    let mut events = conn.events();
                    slot.borrow_mut().conn = Some(Rc::new(conn));
                    while let Some(event) = events.next().await {
                        let closed = matches!(event, ConnectionEvent::Closed(_));
                        log.borrow_mut()
                            .push(stamp(&clock, format!("slot{i}: {event:?}")));
                        if closed {
                            break;
                        }
                    }
                });
            }
        }
        for j in 0..CONNS * CHANS {
            let Some(conn) = self.conns[j / CHANS]
                .borrow()
                .conn
                .clone()
                .filter(|c| !c.is_closed())
            else {
                continue;
            };
            let slot = self.chans[j].clone();
            let dead = {
                let s = slot.borrow();
                !s.opening && s.chan.as_ref().is_none_or(|c| c.is_closed())
            };
            if !dead {
                continue;
            }
            {
                let mut s = slot.borrow_mut();
                s.opening = true;
                s.chan = None;
                s.unsettled.clear();
                s.consumers.clear();
                s.confirm_tags.clear();
            }
            let (log, clock) = (self.log.clone(), self.clock.clone());
            self.spawn(async move {
                let opened = match conn.open_channel().await {
                    Ok(chan) => chan.confirm_select().await.map(|()| chan),
                    Err(err) => Err(err),
                };
                let chan = match opened {
                    Ok(chan) => Rc::new(chan),
                    Err(err) => {
                        slot.borrow_mut().opening = false;
                        log.borrow_mut()
                            .push(stamp(&clock, format!("chan{j}: open failed: {err}")));
                        return;
                    }
                };
                let mut events = chan.events();
                {
                    let mut s = slot.borrow_mut();
                    s.opening = false;
                    s.chan = Some(chan.clone());
                }
                while let Some(event) = events.next().await {
                    log.borrow_mut()
                        .push(stamp(&clock, format!("chan{j}: {event:?}")));
                    let mut s = slot.borrow_mut();
                    // The slot may hold a newer channel by now.
                    if !s.chan.as_ref().is_some_and(|c| Rc::ptr_eq(c, &chan)) {
                        continue;
                    }
                    match event {
                        ChannelEvent::Delivery(d) if !d.consumer_tag.ends_with("-noack") => {
                            s.unsettled.push(d.delivery_tag);
                        }
                        ChannelEvent::Ack { delivery_tag, .. }
                        | ChannelEvent::Nack { delivery_tag, .. } => {
                            assert!(
                                !s.confirm_tags.contains(&delivery_tag),
                                "confirm {delivery_tag} twice"
                            );
                            s.confirm_tags.push(delivery_tag);
                        }
                        ChannelEvent::ConsumerCancelled { consumer_tag } => {
                            s.consumers.retain(|c| *c != consumer_tag);
                        }
                        ChannelEvent::Closed(_) => break,
                        _ => {}
                    }
                }
            });
        }
    }

    fn chan(&self, j: usize) -> Option<Rc<SimChannel>> {
        self.chans[j]
            .borrow()
            .chan
            .clone()
            .filter(|c| !c.is_closed())
    }

    fn conn_id(&self, i: usize) -> Option<amqp_rebound_sim::SimConnectionId> {
        self.conns[i].borrow().conn.as_ref().map(|c| c.id())
    }

    fn queue_name(&self, q: usize) -> String {
        match QUEUES.get(q) {
            Some(name) => (*name).to_owned(),
            None => {
                let named = self.server_named.borrow();
                named
                    .last()
                    .cloned()
                    .unwrap_or_else(|| "amq.gen-missing".to_owned())
            }
        }
    }

    fn apply(&mut self, step: &Step) {
        self.repair();
        match *step {
            Step::Advance(ms) => self.run_for(Duration::from_millis(ms)),
            Step::Declare {
                chan,
                queue,
                odd,
                exclusive,
                auto_delete,
            } => {
                let Some(ch) = self.chan(chan) else { return };
                // q1 is transient, the others durable.
                let durable = (queue != 1) != odd;
                let decl = QueueDecl {
                    name: self.queue_name(queue),
                    durable,
                    exclusive,
                    auto_delete,
                    ..QueueDecl::default()
                };
                self.spawn(async move {
                    let _ = ch.declare_queue(&decl).await;
                });
            }
            Step::DeclareServerNamed { chan } => {
                let Some(ch) = self.chan(chan) else { return };
                let named = self.server_named.clone();
                self.spawn(async move {
                    if let Ok(info) = ch.declare_queue(&QueueDecl::server_named()).await {
                        named.borrow_mut().push(info.name);
                    }
                });
            }
            Step::DeclareExchange { chan, durable } => {
                let Some(ch) = self.chan(chan) else { return };
                let decl = ExchangeDecl {
                    durable,
                    ..ExchangeDecl::new("ex.t", ExchangeKind::Topic)
                };
                self.spawn(async move {
                    let _ = ch.declare_exchange(&decl).await;
                });
            }
            Step::DeleteQueue { chan, queue } => {
                let Some(ch) = self.chan(chan) else { return };
                let name = self.queue_name(queue);
                self.spawn(async move {
                    let _ = ch.delete_queue(&name).await;
                });
            }
            Step::Bind {
                chan,
                queue,
                exchange,
                pattern,
            } => {
                let Some(ch) = self.chan(chan) else { return };
                let name = self.queue_name(queue);
                self.spawn(async move {
                    let _ = ch
                        .bind_queue(
                            &name,
                            EXCHANGES[exchange],
                            PATTERNS[pattern],
                            &FieldTable::default(),
                        )
                        .await;
                });
            }
            Step::Publish {
                chan,
                exchange,
                key,
                mandatory,
                persistent,
                count,
            } => {
                let Some(ch) = self.chan(chan) else { return };
                let mut properties = Properties::default();
                if persistent {
                    properties = properties.persistent();
                }
                let message = Message::new(EXCHANGES[exchange], KEYS[key], format!("{step:?}"))
                    .with_properties(properties)
                    .mandatory(mandatory);
                self.spawn(async move {
                    for _ in 0..count {
                        let _ = ch.publish(&message).await;
                    }
                });
            }
            Step::Consume {
                chan,
                queue,
                prefetch,
                no_ack,
            } => {
                let Some(ch) = self.chan(chan) else { return };
                self.next_consumer += 1;
                let tag = format!(
                    "c{}{}",
                    self.next_consumer,
                    if no_ack { "-noack" } else { "" }
                );
                self.chans[chan].borrow_mut().consumers.push(tag.clone());
                let name = self.queue_name(queue);
                let options = ConsumeOptions {
                    no_ack,
                    prefetch: Some(prefetch),
                    ..ConsumeOptions::default()
                };
                self.spawn(async move {
                    let _ = ch.consume(&name, &tag, &options).await;
                });
            }
            Step::Cancel { chan } => {
                let Some(ch) = self.chan(chan) else { return };
                let Some(tag) = self.chans[chan].borrow_mut().consumers.pop() else {
                    return;
                };
                self.spawn(async move {
                    let _ = ch.cancel(&tag).await;
                });
            }
            Step::Ack {
                chan,
                pick,
                multiple,
            }
            | Step::Nack {
                chan,
                pick,
                multiple,
                ..
            } => {
                let Some(ch) = self.chan(chan) else { return };
                let tag = {
                    let mut s = self.chans[chan].borrow_mut();
                    if s.unsettled.is_empty() {
                        return;
                    }
                    let tag = s.unsettled[pick % s.unsettled.len()];
                    if multiple {
                        s.unsettled.retain(|t| *t > tag);
                    } else {
                        s.unsettled.retain(|t| *t != tag);
                    }
                    tag
                };
                let nack = match *step {
                    Step::Nack { requeue, .. } => Some(requeue),
                    _ => None,
                };
                self.spawn(async move {
                    let _ = match nack {
                        None => ch.ack(tag, multiple).await,
                        Some(requeue) if multiple => ch.nack(tag, true, requeue).await,
                        Some(requeue) => ch.reject(tag, requeue).await,
                    };
                });
            }
            Step::BogusAck { chan } => {
                let Some(ch) = self.chan(chan) else { return };
                self.bogus_acks += 1;
                self.spawn(async move {
                    let _ = ch.ack(1_000_000, false).await;
                });
            }
            Step::CloseChannel { chan } => {
                let Some(ch) = self.chan(chan) else { return };
                self.spawn(async move {
                    let _ = ch.close().await;
                });
            }
            Step::CloseConnection { conn } => {
                let Some(c) = self.conns[conn].borrow().conn.clone() else {
                    return;
                };
                self.spawn(async move {
                    let _ = c.close().await;
                });
            }
            Step::Kill { conn } => {
                if let Some(id) = self.conn_id(conn) {
                    self.broker.kill_connection(id);
                }
            }
            Step::Restart { downtime_ms } => {
                self.broker.restart(Duration::from_millis(downtime_ms))
            }
            Step::Partition { host } => {
                self.broker.partition(HOSTS[host]);
            }
            Step::Heal { host } => {
                self.broker.heal(HOSTS[host]);
            }
            Step::Refuse { host, ms } => {
                self.broker
                    .refuse_dials(HOSTS[host], Duration::from_millis(ms));
            }
            Step::Block { conn, on } => {
                if let Some(id) = self.conn_id(conn) {
                    if on {
                        self.broker.block_connection(id, "test");
                    } else {
                        self.broker.unblock_connection(id);
                    }
                }
            }
            Step::Alarm { on } => {
                if on {
                    self.broker.set_alarm("memory");
                } else {
                    self.broker.clear_alarm();
                }
            }
            Step::Confirms { mode } => self.broker.set_confirm_mode(match mode {
                0 => ConfirmMode::Normal,
                1 => ConfirmMode::Delay(Duration::from_millis(300)),
                2 => ConfirmMode::Drop,
                _ => ConfirmMode::Nack,
            }),
            Step::BrokerCancel { chan } => {
                let tag = self.chans[chan].borrow().consumers.first().cloned();
                if let Some(tag) = tag {
                    self.broker.cancel_consumer(&tag);
                }
            }
            Step::BrokerCloseChannel { chan, code } => {
                let number = self.chan(chan).map(|c| (c.connection_id(), c.number()));
                if let Some((id, number)) = number {
                    self.broker.close_channel(id, number, code, "test");
                }
            }
            Step::AdminDeleteQueue { queue } => {
                let name = self.queue_name(queue);
                self.broker.delete_queue(&name);
            }
        }
        self.run_for(Duration::from_millis(1));
    }

    fn run_for(&mut self, duration: Duration) {
        let pool = &mut self.pool;
        self.clock.run_for(duration, || pool.run_until_stalled());
    }

    /// Connects every slot and declares the base topology.
    fn setup(&mut self) {
        for _ in 0..3 {
            self.repair();
            self.run_for(Duration::from_millis(5));
        }
        let ch = self.chan(0).expect("channel 0 is open");
        self.spawn(async move {
            for (i, name) in QUEUES.iter().enumerate() {
                let decl = QueueDecl {
                    name: (*name).to_owned(),
                    durable: i != 1,
                    ..QueueDecl::default()
                };
                ch.declare_queue(&decl).await.expect("declare");
            }
            let decl = ExchangeDecl::new("ex.t", ExchangeKind::Topic);
            ch.declare_exchange(&decl).await.expect("declare exchange");
            let none = FieldTable::default();
            ch.bind_queue("q2", "ex.t", "a.#", &none)
                .await
                .expect("bind");
            ch.bind_queue("q1", "amq.fanout", "", &none)
                .await
                .expect("bind");
            ch.bind_queue("q0", "amq.topic", "#", &none)
                .await
                .expect("bind");
        });
        self.run_for(Duration::from_millis(20));
        assert_eq!(self.broker.queue_names(), QUEUES);
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let stats = self.broker.stats();
        prop_assert!(stats.is_conserved(), "not conserved: {stats:#?}");
        prop_assert!(
            stats.unknown_tag_acks <= self.bogus_acks,
            "{} unknown tags, {} bogus acks",
            stats.unknown_tag_acks,
            self.bogus_acks
        );
        prop_assert!(
            stats.confirms_acked + stats.confirms_nacked + stats.confirms_dropped
                <= stats.published
        );
        Ok(())
    }

    /// Ends every fault and lets the system settle.
    fn settle(&mut self) {
        for host in HOSTS {
            self.broker.heal(host);
            self.broker.accept_dials(host);
        }
        self.broker.clear_alarm();
        for id in self.broker.open_connections() {
            self.broker.unblock_connection(id);
        }
        self.broker.set_confirm_mode(ConfirmMode::Normal);
        for _ in 0..3 {
            self.repair();
            self.run_for(Duration::from_secs(30));
        }
    }
}

impl World {
    /// Consumes every queue it can and acks everything until the queues are
    /// empty: after the faults end, nothing is stuck.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let ch = self.chan(0);
        prop_assert!(ch.is_some(), "channel 0 did not reopen");
        let ch = ch.unwrap();
        let owner = ch.connection_id();
        let queues: Vec<String> = self
            .broker
            .queues()
            .into_iter()
            .filter(|q| q.exclusive_owner.is_none_or(|o| o == owner))
            .map(|q| q.name)
            .collect();
        for name in &queues {
            let ch = ch.clone();
            let (name, tag) = (name.clone(), format!("drain-{name}"));
            self.chans[0].borrow_mut().consumers.push(tag.clone());
            // basic.qos is per channel: undo what earlier consumers set.
            let options = ConsumeOptions {
                prefetch: Some(0),
                ..ConsumeOptions::default()
            };
            self.spawn(async move {
                let _ = ch.consume(&name, &tag, &options).await;
            });
        }
        let drained = |w: &World| {
            queues.iter().all(|name| {
                w.broker
                    .queue(name)
                    .is_none_or(|q| q.ready.is_empty() && q.unacked.is_empty())
            })
        };
        for _ in 0..200 {
            self.run_for(Duration::from_millis(100));
            if drained(self) {
                break;
            }
            for j in 0..CONNS * CHANS {
                let Some(ch) = self.chan(j) else { continue };
                let top = self.chans[j].borrow_mut().unsettled.drain(..).max();
                if let Some(tag) = top {
                    self.spawn(async move {
                        let _ = ch.ack(tag, true).await;
                    });
                }
            }
        }
        for name in &queues {
            let q = self.broker.queue(name);
            prop_assert!(
                q.as_ref()
                    .is_none_or(|q| q.ready.is_empty() && q.unacked.is_empty()),
                "{name} not drained: {q:#?}"
            );
        }
        Ok(())
    }
}

fn run(seed: u64, steps: &[Step]) -> Result<World, TestCaseError> {
    let mut world = World::new(seed);
    world.setup();
    for step in steps {
        world.apply(step);
        world.check()?;
    }
    world.settle();
    world.check()?;
    // After the faults end, both connection slots are back.
    for i in 0..CONNS {
        let back = world.conns[i]
            .borrow()
            .conn
            .as_ref()
            .is_some_and(|c| !c.is_closed());
        prop_assert!(back, "slot {i} did not reconnect");
    }
    world.drain()?;
    world.check()?;
    Ok(world)
}

fn config() -> Config {
    let seed = std::env::var("REBOUND_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0b0c);
    Config {
        cases: 96,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_workloads_conserve_messages(seed in any::<u64>(), steps in prop::collection::vec(step(), 1..80)) {
        let world = run(seed, &steps)?;
        if !steps.iter().any(|s| matches!(s, Step::BogusAck { .. })) {
            prop_assert_eq!(world.broker.unknown_tag_acks(), 0);
        }
    }

    #[test]
    fn same_seed_same_trace(seed in any::<u64>(), steps in prop::collection::vec(step(), 1..40)) {
        let a = run(seed, &steps)?;
        let b = run(seed, &steps)?;
        prop_assert_eq!(a.broker.trace(), b.broker.trace());
        prop_assert_eq!(a.log.borrow().clone(), b.log.borrow().clone());
        prop_assert_eq!(a.broker.queue_names(), b.broker.queue_names());
        prop_assert_eq!(a.broker.stats(), b.broker.stats());
        prop_assert_eq!(a.clock.elapsed(), b.clock.elapsed());
    }
}

#[test]
fn a_fixed_scenario_replays_and_the_seed_picks_the_names() {
    let steps = vec![
        Step::DeclareServerNamed { chan: 0 },
        Step::DeclareServerNamed { chan: 2 },
        Step::Consume {
            chan: 1,
            queue: 0,
            prefetch: 1,
            no_ack: false,
        },
        Step::Publish {
            chan: 2,
            exchange: 0,
            key: 0,
            mandatory: false,
            persistent: true,
            count: 4,
        },
        Step::Publish {
            chan: 3,
            exchange: 3,
            key: 2,
            mandatory: true,
            persistent: false,
            count: 2,
        },
        Step::Advance(10),
        Step::Ack {
            chan: 1,
            pick: 0,
            multiple: false,
        },
        Step::Partition { host: 1 },
        Step::Kill { conn: 0 },
        Step::Advance(25_000),
        Step::Restart { downtime_ms: 500 },
        Step::Advance(1_000),
        // Each step re-dials or reopens what is dead: one to dial, one to open.
        Step::Advance(5),
        Step::Advance(5),
        Step::DeclareServerNamed { chan: 0 },
    ];
    let a = run(7, &steps).unwrap();
    let b = run(7, &steps).unwrap();
    let c = run(8, &steps).unwrap();
    let names = |w: &World| w.server_named.borrow().clone();
    assert_eq!(names(&a).len(), 3);
    assert_eq!(names(&a), names(&b));
    assert_ne!(names(&a), names(&c));
    assert_eq!(*a.log.borrow(), *b.log.borrow());
    assert_eq!(a.broker.trace(), b.broker.trace());
    let log = a.log.borrow().join("\n");
    assert!(log.contains("HeartbeatTimeout"), "{log}");
    assert!(log.contains("320"), "{log}");
}
