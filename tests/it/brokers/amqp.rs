//! RabbitMQ targets: `amqp://user:pass@host:port/{vhost}?exchange=E&routing_key=K`.
