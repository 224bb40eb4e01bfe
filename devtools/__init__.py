"""Developer tooling: private RabbitMQ/Redis nodes and the processes of `make run` and the tests."""
