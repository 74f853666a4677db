//! Failed dials leave no tokio tasks behind (the cases are in
//! `amqp_rebound_tests::task_leak`), against the real broker at `AMQP_URL`.

amqp_rebound_tests::task_leak_suite!(amqp_rebound_lapin::LapinTransport::new());
