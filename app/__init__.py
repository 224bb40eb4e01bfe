"""modelserve: a Keras model served by Flask/waitress through RabbitMQ to Celery workers."""

__version__ = "0.1.0"
