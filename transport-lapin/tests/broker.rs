//! The lapin adapter against a real RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): the adapter suite, whose cases are in
//! `amqp_rebound_tests::adapter`, the same for every transport.

amqp_rebound_tests::adapter_suite!(amqp_rebound_lapin::LapinTransport);
