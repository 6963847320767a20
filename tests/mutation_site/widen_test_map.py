"""Give every mutated function the tests of the named files, in mutmut's test map.

    python -m widen_test_map tests/test_guarantees.py [...]

mutmut runs, for each mutant, only the tests that called its function in the
test process.  The guarantee tests reach the transport from child processes,
which mutmut cannot see; without this they would never run against a mutant.
Run after a first ``mutmut run`` (which writes mutants/mutmut-stats.json).
"""
import json
import sys
from pathlib import Path

STATS = Path('mutants/mutmut-stats.json')


def main(test_files):
    stats = json.loads(STATS.read_text())
    tests = [t for t in stats['duration_by_test'] if t.split('::')[0] in test_files]
    if not tests:
        sys.exit(f'no tests of {test_files} in {STATS}: run the tests under mutmut first')
    functions = set(stats['tests_by_mangled_function_name'])
    for meta in Path('mutants').rglob('*.py.meta'):
        for mutant in json.loads(meta.read_text())['exit_code_by_key']:
            functions.add(mutant.rsplit('__mutmut_', 1)[0])
    by_function = stats['tests_by_mangled_function_name']
    for function in functions:
        by_function[function] = sorted(set(by_function.get(function, [])) | set(tests))
    STATS.write_text(json.dumps(stats, indent=4))
    print(f'{len(tests)} tests added to {len(functions)} functions')


if __name__ == '__main__':
    main(sys.argv[1:])
