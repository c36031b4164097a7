"""Send samples with ceilometer's own publishers (PyPI `ceilometer`), as a real client.

usage: publish.py udp|tcp HOST PORT SECRET COUNT PREFIX
Prints one message_id per line for every sample published.
"""
import datetime
import sys

from oslo_config import cfg
from oslo_utils import netutils

from ceilometer import sample
from ceilometer.publisher import tcp, udp, utils


def main():
    kind, host, port, secret, count, prefix = sys.argv[1:7]
    conf = cfg.ConfigOpts()
    conf.register_opts(utils.OPTS, group='publisher')
    # ceilometer's service options the publishers read (normally from ceilometer.service).
    conf.register_opts([cfg.StrOpt('host', default='e2e-host')])
    conf([], project='ceilometer', validate_default_values=True)
    conf.set_override('telemetry_secret', secret, group='publisher')
    url = netutils.urlsplit('%s://%s:%s' % (kind, host, port))
    pub = {'udp': udp.UDPPublisher, 'tcp': tcp.TCPPublisher}[kind](conf, url)
    samples = []
    for i in range(int(count)):
        s = sample.Sample(
            name='cpu', type=sample.TYPE_CUMULATIVE, unit='ns', volume=1000 + i,
            user_id='user-%d' % (i % 3), project_id='proj-1', resource_id='res-%d' % (i % 5),
            timestamp=datetime.datetime(2026, 11, 1, 12, 0, 0, i).isoformat(),
            resource_metadata={'flavor': {'name': 'm1.small', 'vcpus': 2},
                               'tags': ['a', 'ü'], 'ratio': 0.5 + i},
            source='openstack', id='%s-%d' % (prefix, i))
        samples.append(s)
    pub.publish_samples(samples)
    for s in samples:
        print(s.id)


if __name__ == '__main__':
    main()
