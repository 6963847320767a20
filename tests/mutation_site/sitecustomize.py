"""On PYTHONPATH only under ``tox -e mutation`` (see docs/testing.md).

The tests start real processes, which inherit mutmut's MUTANT_UNDER_TEST and
so run the mutant under test too.  While mutmut maps tests to functions
('stats'), only the test process records calls: a child would look for
mutmut's configuration in its own working directory and fail.
"""
import os

if os.environ.get('MUTANT_UNDER_TEST') == 'stats':
    os.environ['MUTANT_UNDER_TEST'] = ''
