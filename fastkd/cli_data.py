"""The distill command's data: its flags -> the train/valid/test splits, their description for
the report, the read reports and the serving encoder (:func:`read_splits`)."""
from __future__ import annotations


def read_splits(args):
    """``(train, valid, test, description, read reports, RawRowEncoder or None)`` from the
    distill command's data flags (``--data`` or ``--train/--valid/--test``, the encoder and
    malformed-row flags, ``--cache-dir``)."""
    from . import distributed
    from .data import CTRData, load

    numeric = args.numeric or ()
    # under torchrun every rank reads and encodes its share of the files, then all hold the data
    sharded = distributed.get_world_size() > 1
    # malformed rows: skipped with a warning up to --max-bad-rows (load()'s default: 1 %), an error above
    checks = dict(strict=args.strict) if args.max_bad_rows is None else \
        dict(strict=args.strict, max_bad_rows=args.max_bad_rows)
    if args.encoder == "hash" and args.num_buckets is None:
        raise ValueError("--encoder hash needs --num-buckets (one count for every field, or one per field: "
                         "e.g. --num-buckets 1000000 or --num-buckets 1000,50000,...)")
    if args.encoder != "hash" and args.num_buckets is not None:
        raise ValueError("--num-buckets is for --encoder hash (the vocab encoder sizes fields from the data)")
    buckets = None if args.num_buckets is None else (
        args.num_buckets[0] if len(args.num_buckets) == 1 else args.num_buckets)
    # flags that would otherwise be ignored without a word
    kinds = {spec.split(":", 1)[0].lower() for spec in (args.data, args.train, args.valid, args.test) if spec}
    if args.label is not None and not kinds & {"csv", "parquet", "avazu"}:
        raise ValueError(f"--label names a column of csv, parquet or avazu data; {', '.join(sorted(kinds))} data has its "
                         "label in a fixed place")
    if args.cache_dir and not args.data:
        raise ValueError("--cache-dir works with --data (one source split 80/10/10); with --train/--valid/--test "
                         "nothing would be cached")
    if args.cache_dir and kinds & {"synthetic", "segmented"}:
        raise ValueError("--cache-dir caches encoded files; generated data (synthetic/segmented) is made in "
                         "memory and has nothing to cache: drop --cache-dir")
    if args.data:
        paths = [p for p in args.data.split(":", 1)[-1].split(",") if p]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"--data names {', '.join(twice)} more than once: its rows would be in training and "
                             "test splits alike")
    common = dict(kind=args.encoder, min_count=args.min_count, num_buckets=buckets, label=args.label,
                  numeric=numeric, sharded=sharded, **checks)
    if args.data:
        if args.train or args.valid or args.test:
            raise ValueError("give either --data or --train/--valid/--test, not both")
        if args.cache_dir:
            (train, valid, test), enc, folder = _cached(args, common)
            whole = CTRData.concat([train, valid, test])  # a Rows view of the mapped parts, no copy
            n, rate, report = len(whole), whole.positive_rate, train.read_report
            cached = f"; encoded once into the memory-mapped cache `{folder}`"
        else:
            data, enc = load(args.data, return_encoder=True, **common)
            train, valid, test = data.split((0.8, 0.1, 0.1), seed=args.split_seed)
            n, rate, report, cached = len(data), float(data.labels.mean()), data.read_report, ""
        desc = (f"`{args.data}`: {n:,} rows, {len(train.field_sizes)} fields, positive rate "
                f"{rate:.3f}; rows permuted by numpy.random.default_rng({args.split_seed}), "
                f"80/10/10 -> {len(train):,} / {len(valid):,} / {len(test):,}; {args.encoder} encoding fitted on "
                f"the whole file (no labels used){cached}")
        reports = {"data": report}
        kind = args.data
    else:
        if not (args.train and args.valid and args.test):
            raise ValueError("give --data KIND:PATH, or all three of --train, --valid and --test")
        train, enc = load(args.train, return_encoder=True, **common)
        rest = dict(encoder=enc, label=args.label, numeric=numeric, sharded=sharded, **checks)
        valid, test = (_load_named(flag, spec, rest) for flag, spec in (("--valid", args.valid), ("--test", args.test)))
        desc = (f"train `{args.train}` ({len(train):,}), valid `{args.valid}` ({len(valid):,}), test "
                f"`{args.test}` ({len(test):,}); {args.encoder} encoding fitted on train")
        reports = {"train": train.read_report, "valid": valid.read_report, "test": test.read_report}
        kind = args.train
    encoder = None
    if enc is not None:  # files (not generated data): the encoder and the readers' per-field rules, for serving
        from .serving import RawRowEncoder, field_rules

        encoder = RawRowEncoder(enc, field_rules(kind.split(":", 1)[0], enc.field_names, numeric))
    # generated data (synthetic:N) read no file: no report
    return train, valid, test, desc, {k: r.to_dict() for k, r in reports.items() if r is not None}, encoder


def _load_named(flag: str, spec: str, settings: dict):
    """``load(spec)`` with the encoder fitted on --train; a file that does not match it (other
    columns, other field count) is named by its flag."""
    from .data import load

    try:
        return load(spec, **settings)
    except ValueError as e:
        raise ValueError(f"{flag} {spec}: {e}") from None


def _cached(args, common: dict):
    """--data through the on-disk encoded cache (fastkd.data.cached_split): the split parts are
    memory-mapped views of files written once per source and settings (under torchrun by rank 0,
    then mapped by every rank)."""
    from .data import cached_split

    settings = {k: v for k, v in common.items() if k not in ("sharded", "strict")}
    if common.get("strict"):
        raise ValueError("--strict and --cache-dir do not combine: the cache skips and reports malformed rows "
                         "(use --max-bad-rows 0 to refuse any)")
    return cached_split(args.data, args.cache_dir, (0.8, 0.1, 0.1), args.split_seed, **settings)

