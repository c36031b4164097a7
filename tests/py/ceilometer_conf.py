"""Write a ceilometer.conf with ceilometer's real option names and defaults.

usage: ceilometer_conf.py CEILOMETER_SDIST_DIR OUT_FILE [section.key=value ...]
(a key given twice is written twice: a multi-valued option)

The collector options come from the source of the last ceilometer release that had the
collector (9.0.x, Pike; PyPI sdist, unpacked in CEILOMETER_SDIST_DIR): `opts.py`'s
`list_opts()` names the section of every option list, and each list's `cfg.*Opt(...)` calls
give the names and defaults; `messaging.py`'s overrides of oslo.messaging defaults (the rabbit
prefetch, the control exchange) are applied as ceilometer applies them. The oslo options
(oslo.messaging's [DEFAULT] transport options and [oslo_messaging_rabbit], oslo.log's
[DEFAULT] options) come from the oslo libraries installed in this Python. Options with no
default (None) are left out, as oslo-config-generator comments them out. The trailing
`section.key=value` arguments set values (e.g. a connection URL) after the defaults.
"""
import ast
import os
import sys

# The sections the collector service read, by the module attribute opts.py lists for them.
WANTED = ('DEFAULT', 'collector', 'database', 'dispatcher_file', 'publisher',
          'publisher_notifier')


def literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def module_opts(root, dotted):
    """{list name: [(option name, default)]} of every `NAME = [cfg.XOpt(...), ...]`."""
    path = os.path.join(root, *dotted.split('.')) + '.py'
    if not os.path.exists(path):
        path = os.path.join(root, *dotted.split('.'), '__init__.py')
    tree = ast.parse(open(path).read())
    out = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
            continue
        opts = []
        for call in node.value.elts:
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr.endswith('Opt') and call.args):
                continue
            name = literal(call.args[0])
            default = None
            for kw in call.keywords:
                if kw.arg == 'default':
                    default = literal(kw.value)
            opts.append((name, default))
        for t in node.targets:
            if isinstance(t, ast.Name):
                out[t.id] = opts
    return out


def ceilometer_sections(root):
    """[(section, [(name, default)])] from opts.py's list_opts()."""
    tree = ast.parse(open(os.path.join(root, 'ceilometer', 'opts.py')).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'list_opts')
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    result = []
    for tup in ret.value.elts:
        section = literal(tup.elts[0])
        if section not in WANTED:
            continue
        refs = [n for n in ast.walk(tup.elts[1]) if isinstance(n, ast.Attribute)
                and isinstance(n.value, (ast.Attribute, ast.Name))]
        opts = []
        for ref in refs:
            dotted = ast.unparse(ref.value)
            if not dotted.startswith('ceilometer'):
                continue
            try:
                lists = module_opts(root, dotted)
            except (OSError, SyntaxError):
                continue
            opts.extend(lists.get(ref.attr, []))
        result.append((section, opts))
    return result


def ceilometer_overrides(root):
    """ceilometer/messaging.py: cfg.set_defaults(impl_rabbit.rabbit_opts, k=v) and
    oslo_messaging.set_transport_defaults('exchange')."""
    tree = ast.parse(open(os.path.join(root, 'ceilometer', 'messaging.py')).read())
    rabbit, default = {}, {}
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
            continue
        if call.func.attr == 'set_defaults' and call.args and 'rabbit' in ast.unparse(call.args[0]):
            for kw in call.keywords:
                rabbit[kw.arg] = literal(kw.value)
        if call.func.attr == 'set_transport_defaults' and call.args:
            default['control_exchange'] = literal(call.args[0])
    return rabbit, default


def oslo_sections():
    from oslo_log import _options as log_opts
    from oslo_messaging import transport
    from oslo_messaging._drivers import amqp, impl_rabbit
    default = [(o.dest, o.default) for o in transport._transport_opts]
    for group in (log_opts.common_cli_opts, log_opts.logging_cli_opts,
                  log_opts.generic_log_opts, log_opts.log_opts):
        default.extend((o.dest, o.default) for o in group)
    rabbit = [(o.dest, o.default) for o in amqp.amqp_opts + impl_rabbit.rabbit_opts]
    return default, rabbit


def ini_value(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, (list, tuple)):
        return ','.join(str(x) for x in v)
    if isinstance(v, dict):
        return ','.join('%s:%s' % kv for kv in v.items())
    return str(v)


def main():
    root, out = sys.argv[1], sys.argv[2]
    sets = {}
    for arg in sys.argv[3:]:
        key, value = arg.split('=', 1)
        section, name = key.split('.', 1)
        sets.setdefault(section, {}).setdefault(name, []).append(value)
    sections = {}
    for section, opts in ceilometer_sections(root):
        sections.setdefault(section, {}).update(opts)
    oslo_default, oslo_rabbit = oslo_sections()
    sections['DEFAULT'].update(oslo_default)
    sections['oslo_messaging_rabbit'] = dict(oslo_rabbit)
    rabbit_over, default_over = ceilometer_overrides(root)
    sections['oslo_messaging_rabbit'].update(rabbit_over)
    sections['DEFAULT'].update(default_over)
    for section in sets:
        sections.setdefault(section, {})
    with open(out, 'w') as f:
        for section, opts in sections.items():
            f.write('[%s]\n' % section)
            for name, default in opts.items():
                if name in sets.get(section, {}):
                    continue
                if default is None or default == [] or default == '':
                    continue
                v = ini_value(default)
                if '\n' in v:
                    continue
                f.write('%s = %s\n' % (name, v))
            # Set values last; a repeated key is a multi-valued option (MultiStrOpt).
            for name, values in sets.get(section, {}).items():
                for v in values:
                    f.write('%s = %s\n' % (name, v))
            f.write('\n')


if __name__ == '__main__':
    main()
