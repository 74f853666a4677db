//! The transport conformance suite against the real broker at `AMQP_URL`, once per
//! transport. See the crate docs of `amqp-rebound-tests` for how the cases are
//! serialised.

amqp_rebound_tests::conformance_suite!(lapin, amqp_rebound_lapin::LapinTransport::new());
amqp_rebound_tests::conformance_suite!(amqprs, amqp_rebound_amqprs::AmqprsTransport::new());
