"""``python -m tasks.simulator``: an Ollama simulator on a port (see the package doc)."""
from __future__ import annotations

import argparse
import logging

from . import __doc__ as DOC
from .models import DEFAULT_MODELS, FAULT_KINDS, Simulator
from .server import serve

logger = logging.getLogger('tasks.simulator')


def _parse_models(text):
    models = {}
    for part in filter(None, (p.strip() for p in text.split(','))):
        name, _, slots = part.rpartition('=') if '=' in part else (part, '', '1')
        models[name] = int(slots)
    return models


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m tasks.simulator', description=DOC.split('\n')[0])
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=11434)
    p.add_argument('--models', default=','.join(f'{m}={n}' for m, n in DEFAULT_MODELS.items()),
                   help='NAME=SLOTS,... (default: %(default)s)')
    p.add_argument('--token-rate', type=float, default=200.0, help='tokens per second')
    p.add_argument('--load-time', type=float, default=0.0,
                   help='seconds a model takes to load on first use')
    p.add_argument('--tokens', type=int, default=8,
                   help='tokens per answer when the request sets no num_predict')
    p.add_argument('--fault', action='append', default=[],
                   help='KIND[,MODEL[,COUNT[,SECONDS]]], KIND one of ' + ', '.join(FAULT_KINDS)
                   + '; COUNT -1 means every request')
    p.add_argument('-v', '--verbose', action='store_true')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(name)s %(message)s')
    sim = Simulator(_parse_models(args.models), args.token_rate, args.load_time, args.tokens)
    for spec in args.fault:
        parts = spec.split(',')
        kind, model, count, seconds = (parts + ['*', '1', '30'][len(parts) - 1:])[:4]
        sim.add_fault(kind, model, int(count), float(seconds))
    logger.info('Ollama simulator on http://%s:%d with models %s', args.host, args.port,
                ', '.join(f'{m} ({n} slots)' for m, n in sim.models.items()))
    try:
        serve(args.host, args.port, sim)
    except KeyboardInterrupt:
        pass


main()
