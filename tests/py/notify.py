"""Publish samples with ceilometer's own `notifier://` publisher (PyPI `ceilometer`,
`oslo.messaging`, `kombu`) to RabbitMQ, as a real ceilometer would.

usage: notify.py HOST:PORT EXCHANGE TOPIC SECRET COUNT PER_MESSAGE PREFIX [durable]
       notify.py --delete HOST:PORT EXCHANGE QUEUE    (test cleanup, with py-amqp)

`SampleNotifierPublisher` with `notifier://guest:guest@HOST:PORT/?topic=TOPIC` sends, through
oslo.messaging's `messagingv2` driver over the rabbit transport, one notification per
`publish_samples` call on the topic exchange EXCHANGE (oslo's `control_exchange`) with routing
key `TOPIC.sample`, declaring the queue `TOPIC.sample` as oslo does. COUNT samples go out in
notifications of PER_MESSAGE samples each. `durable` sets `amqp_durable_queues`.
Prints one message_id per line for every sample published.
"""
import datetime
import sys


def delete(address, exchange, queue):
    import amqp as pyamqp
    conn = pyamqp.Connection(address, userid='guest', password='guest')
    conn.connect()
    ch = conn.channel()
    ch.queue_delete(queue)
    ch.exchange_delete(exchange)
    conn.close()


def make_sample(prefix, i):
    # Values chosen to stress JSON fidelity through the signature: a float that is integral
    # (must stay 1.0, not 1), floats with 17 significant digits, big and negative ints, None,
    # non-ASCII text, nested maps and lists.
    volume = [1000 + i, float(i), 0.1 * i + 1 / 3.0, -(2 ** 62) + i][i % 4]
    from ceilometer import sample
    return sample.Sample(
        name='cpu' if i % 2 else 'memory.usage',
        type=sample.TYPE_CUMULATIVE if i % 2 else sample.TYPE_GAUGE,
        unit='ns' if i % 2 else 'MB',
        volume=volume,
        user_id=None if i % 5 == 0 else 'user-%d' % (i % 3),
        project_id='proj-1',
        resource_id='res-%d' % (i % 5),
        timestamp=datetime.datetime(2026, 11, 1, 12, 0, 0, i).isoformat(),
        resource_metadata={'flavor': {'name': 'm1.small', 'vcpus': 2, 'ram': 2048.0},
                           'tags': ['a', 'ü', '\u2603', 'tab\there'],
                           'ratio': 0.5 + i, 'tiny': 5e-324, 'big': 1.7976931348623157e308,
                           'neg': -0.0, 'none': None, 'yes': True},
        source='openstack', id='%s-%d' % (prefix, i))


def main():
    from oslo_config import cfg
    import oslo_messaging
    from oslo_messaging._drivers import amqp
    from oslo_messaging._drivers import impl_rabbit
    from oslo_utils import netutils

    from ceilometer import messaging
    from ceilometer.publisher import messaging as publisher_messaging
    from ceilometer.publisher import utils

    address, exchange, topic, secret, count, per_message, prefix = sys.argv[1:8]
    durable = len(sys.argv) > 8 and sys.argv[8] == 'durable'
    conf = cfg.ConfigOpts()
    conf.register_opts(utils.OPTS, group='publisher')
    conf.register_opts(publisher_messaging.NOTIFIER_OPTS, group='publisher_notifier')
    # ceilometer's service options the publisher reads (normally from ceilometer.service).
    conf.register_opts([cfg.StrOpt('host', default='e2e-host')])
    # The rabbit driver registers these when it loads; registered here to override them.
    conf.register_opts(impl_rabbit.rabbit_opts, group='oslo_messaging_rabbit')
    conf.register_opts(amqp.amqp_opts, group='oslo_messaging_rabbit')
    messaging.setup()  # as ceilometer's service does (control_exchange "ceilometer")
    # The test's own exchange keeps tests apart; the transport reads it when it is created.
    oslo_messaging.set_transport_defaults(exchange)
    conf([], project='ceilometer', validate_default_values=True)
    conf.set_override('telemetry_secret', secret, group='publisher')
    conf.set_override('amqp_durable_queues', durable, group='oslo_messaging_rabbit')
    # Fail fast in tests instead of retrying a dead broker forever.
    conf.set_override('rabbit_retry_interval', 1, group='oslo_messaging_rabbit')
    url = netutils.urlsplit('notifier://guest:guest@%s/?topic=%s' % (address, topic))
    pub = publisher_messaging.SampleNotifierPublisher(conf, url)
    count, per_message = int(count), int(per_message)
    ids = []
    for start in range(0, count, per_message):
        batch = [make_sample(prefix, i) for i in range(start, min(count, start + per_message))]
        pub.publish_samples(batch)
        ids.extend(s.id for s in batch)
    pub.notifier.transport.cleanup()
    for i in ids:
        print(i)


if __name__ == '__main__':
    if sys.argv[1] == '--delete':
        delete(*sys.argv[2:5])
    else:
        main()
