import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's kvembed
from kvembed.bench.baselines import main  # noqa: E402  (the code: kvembed/bench/baselines.py)
sys.exit(main())
