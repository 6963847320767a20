"""``python -m tasks.simulator``: an Ollama simulator on a port (see the package doc)."""
from __future__ import annotations

import argparse
import logging
import os

from . import __doc__ as DOC
from .models import DEFAULT_MODELS, FAULT_KINDS, Simulator
from .server import serve

logger = logging.getLogger('tasks.simulator')


def _parse_models(text, num_parallel):
    models = {}
    for part in filter(None, (p.strip() for p in text.split(','))):
        name, _, n = part.rpartition('=') if '=' in part else (part, '', num_parallel)
        models[name] = int(n)
    return models


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m tasks.simulator', description=DOC.split('\n')[0])
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=11434)
    p.add_argument('--models', default=','.join(DEFAULT_MODELS),
                   help='NAME[=PARALLEL],... models and the requests each runs at once '
                        '(default: %(default)s)')
    p.add_argument('--num-parallel', type=int,
                   default=int(os.environ.get('OLLAMA_NUM_PARALLEL') or 1),
                   help="requests a model runs at once when --models does not say "
                        "(Ollama's OLLAMA_NUM_PARALLEL; default %(default)s)")
    p.add_argument('--max-queue', type=int,
                   default=int(os.environ.get('OLLAMA_MAX_QUEUE') or 512),
                   help="requests that may wait in all before a 503 "
                        "(Ollama's OLLAMA_MAX_QUEUE; default %(default)s)")
    p.add_argument('--token-rate', type=float, default=200.0, help='tokens per second')
    p.add_argument('--load-time', type=float, default=0.0,
                   help='seconds a model takes to load when it is not in memory')
    p.add_argument('--tokens', type=int, default=8,
                   help='tokens per answer when the request sets no num_predict')
    p.add_argument('--fault', action='append', default=[],
                   help='KIND[,MODEL[,COUNT[,SECONDS]]], KIND one of ' + ', '.join(FAULT_KINDS)
                   + '; COUNT -1 means every request')
    p.add_argument('-v', '--verbose', action='store_true')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(name)s %(message)s')
    sim = Simulator(_parse_models(args.models, args.num_parallel), args.token_rate,
                    args.load_time, args.tokens, max_queue=args.max_queue)
    for spec in args.fault:
        parts = spec.split(',')
        kind, model, count, seconds = (parts + ['*', '1', '30'][len(parts) - 1:])[:4]
        sim.add_fault(kind, model, int(count), float(seconds))
    logger.info('Ollama simulator on http://%s:%d with models %s', args.host, args.port,
                ', '.join(f'{m.name} ({m.num_parallel} parallel)' for m in sim.models.values()))
    try:
        serve(args.host, args.port, sim)
    except KeyboardInterrupt:
        pass


main()
