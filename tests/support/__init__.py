"""What the tests share: rank pools, references, fixtures, launchers, and the scripts some tests run
as files. Tests import these (``from support.rankpool import run_ranks``); no test imports another
test file."""
