"""The command-line front ends of the beamtime tools: ``gpusmd avimage``, ``beamcenter``,
``mask``, ``cube`` and ``plot`` (:func:`add_commands` adds them to the ``gpusmd`` parser)."""
from __future__ import annotations

from ..cli import BACKEND_HELP, SOURCE_HELP
from ..errors import GpusmdError


def _outputs_free(force: bool, *paths):
    """Every output refused before any work when it exists (and no --force)."""
    from ..io.output import check_new_output
    for path in paths:
        if path:
            check_new_output(path, force)


def cmd_avimage(args):
    from ..backend import get_backend
    from ..config import load_config
    from .avimage import AvImage, average_image, plot_avimage, write_avimage
    from .select import Selection
    _outputs_free(args.force, args.output, args.png)
    config = load_config(args.config)
    selection = Selection(args.select)
    result = average_image(args.run, config, args.detector, args.events, selection, args.stat,
                           get_backend(args.backend, config=config.backend), args.batch_size,
                           progress=not args.quiet)
    path = write_avimage(args.output, result, args.force)
    a = result["attrs"]
    print(f"{a['detector']}: {a['stat']} of {a['n_events']} events"
          + (f" ({a['selection']})" if selection else "")
          + (f", only {a['n_events']} of the {args.events} asked passed" if "n_events_asked" in a
             else "") + f" -> {path}")
    if args.png:
        print(f"wrote {plot_avimage(AvImage.load(path), args.png, args.force)}")


def _pair(text, what):
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise GpusmdError(f"{what} {text!r}: expected two numbers X,Y") from None
    return a, b


def cmd_beamcenter(args):
    import json
    from .avimage import AvImage
    from ..features.azimuthal import DEFAULT_EBEAM
    from .beamcenter import calibrant_q, fit_beam_center, plot_fit, report, write_poni
    from ..calib.masks import load_user_mask
    _outputs_free(args.force, args.png, args.poni, args.json)
    av = AvImage.load(args.avimage)
    q = list(args.ring or [])
    if args.calibrant:
        q += calibrant_q(args.calibrant, DEFAULT_EBEAM if args.ebeam is None else args.ebeam)
    user_mask = load_user_mask(args.mask, av.shape) if args.mask else None
    if args.fit_tilt and not q:
        raise GpusmdError("--fit-tilt needs rings of known q (--ring Q or --calibrant)")
    bc = fit_beam_center(av, q_known=q or None, distance_mm=args.dis_to_sam,
                         ebeam_keV=args.ebeam, fit_tilt=args.fit_tilt,
                         tilt_deg=(args.tx, args.ty),
                         guess_um=_pair(args.guess, "--guess") if args.guess else None,
                         threshold=args.threshold, smooth=args.smooth, user_mask=user_mask,
                         min_points=args.min_points, max_rings=args.max_rings)
    print(report(bc, av))
    if args.png:
        print(f"wrote {plot_fit(bc, av, args.png, args.force)}")
    if args.poni:
        print(f"wrote {write_poni(bc, av, args.poni, args.force)}")
    if args.json:
        from ..io.output import written_whole
        from pathlib import Path
        out = {"azav": bc.azav(), "poni": bc.poni(), "fitted": bc.fitted,
               "rings": [vars(r) for r in bc.rings], "avimage": str(av.path)}
        with written_whole(Path(args.json)) as part:
            part.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


def cmd_mask(args):
    from .avimage import AvImage
    from .mask import make_mask, plot_mask, save_mask
    _outputs_free(args.force, args.output, args.png)
    av = AvImage.load(args.avimage)
    mask, counts = make_mask(av, args.above, args.below, args.rect or (), args.circle or (),
                             args.polygon or (), args.from_status, args.units, args.start,
                             args.calib_mask)
    path = save_mask(mask, args.output, args.force)
    for rule, n in counts.items():
        print(f"  {rule}: {n} pixels")
    print(f"{int((mask == 0).sum())} of {mask.size} pixels masked -> {path} "
          f"(name it as an ROI's or azav's userMask)")
    if args.png:
        print(f"wrote {plot_mask(av, mask, args.png, args.force)}")


def cmd_cube_merge(args):
    from .cube import merge_cubes, write_cube
    given = [opt for opt, value in (("--bin", args.bin), ("--filter", args.filter),
                                    ("--keys", args.keys), ("--raw", args.raw),
                                    ("--config", args.config)) if value]
    if given:
        raise GpusmdError(f"cube merge adds cube files: {', '.join(given)} belong to making a "
                          f"cube")
    cubes = args.smd[1:]
    if not cubes:
        raise GpusmdError("cube merge: give the cube files to add (gpusmd cube merge A.h5 "
                          "B.h5 ... -o merged.h5)")
    _outputs_free(args.force, args.output)
    result = merge_cubes(cubes)
    path = write_cube(args.output, result, args.force)
    c = result["cube"]
    print(f"{len(cubes)} cubes, {result['attrs']['n_events']} events in "
          f"{' x '.join(map(str, c.shape))} bins; {len(c.sums)} per-event datasets (exact "
          f"sums)" + (f", images of {', '.join(result['images'])}" if result["images"] else "")
          + f" -> {path}")


def cmd_cube(args):
    from ..backend import get_backend
    from .cube import make_cube, parse_bin, write_cube
    from .select import Selection
    if args.smd and args.smd[0] == "merge":
        return cmd_cube_merge(args)
    from ..mpi import rank_share, ranked, said_once
    share = rank_share(args.mpi)

    def prepare():
        if not args.bin:
            raise GpusmdError("cube: give the binning, --bin NAME:EDGES (e.g. "
                              "lightStatus/laser:0,1,2)")
        if args.mpi and not args.raw:
            raise GpusmdError("cube --mpi shares the frames of --raw runs among the ranks: "
                              "without --raw there is nothing to share")
        _outputs_free(args.force, args.output)
        bins = [parse_bin(b) for b in args.bin]
        config = backend = None
        if args.raw:
            from ..config import load_config
            if not args.config:
                raise GpusmdError("--raw needs --config (the calibration of the frames)")
            config = load_config(args.config)
            backend = get_backend(args.backend, config=config.backend)
        return bins, config, backend

    bins, config, backend = said_once(share, prepare)
    with ranked(share, "cube"):
        result = make_cube(args.smd, bins, Selection(args.filter), args.raw, config,
                           args.keys, backend, args.batch_size, not args.quiet, share)
    if share is not None and share.rank != 0:
        return
    path = write_cube(args.output, result, args.force)
    c = result["cube"]
    print(f"{result['attrs']['n_events']} of {c.n_selected} selected events in "
          f"{' x '.join(map(str, c.shape))} bins of {', '.join(n for n, _ in bins)}; "
          f"{len(c.sums)} per-event datasets" + (f", images of {', '.join(result['images'])}"
                                                 if result["images"] else "") + f" -> {path}")


def cmd_plot(args):
    from .plot import plot_small_data
    for path in plot_small_data(args.smd, args.output, args.png, args.det, args.intensity,
                                args.force):
        print(f"wrote {path}")


def _add_run_options(s):
    """The options of the commands that calibrate frames: backend, CPU engine and
    threads, batch size, quiet."""
    from ..backend import BACKEND_CHOICES
    from ..cli import add_cpu_args
    s.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    add_cpu_args(s)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_commands(sub):
    """The beamtime subcommands, on the ``gpusmd`` parser's subparsers ``sub``."""
    from .avimage import STATS

    s = sub.add_parser("avimage", help="an average (max, median, std) image of calibrated frames")
    s.add_argument("run", help=SOURCE_HELP)
    s.add_argument("--config", required=True)
    s.add_argument("--detector", help="the detector (default: the config's only one)")
    s.add_argument("-n", "--events", type=int, default=100,
                   help="the first N events that pass --select (default 100)")
    s.add_argument("--select", action="append", metavar="EXPR",
                   help="per-event cut, e.g. 'lightStatus/xray==1' (repeat or join with &)")
    s.add_argument("--stat", choices=STATS, default="mean")
    s.add_argument("-o", "--output", required=True, help="average-image file (HDF5)")
    s.add_argument("--png", help="a picture of the assembled image")
    _add_run_options(s)
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.set_defaults(func=cmd_avimage)

    s = sub.add_parser("beamcenter", help="fit the beam centre (and distance) to the rings "
                                          "of an average image")
    s.add_argument("avimage", help="average-image file from `gpusmd avimage`")
    s.add_argument("--ring", type=float, action="append", metavar="Q",
                   help="q (1/A) of a ring that may be in the image (repeat); with it the "
                        "distance is fitted")
    s.add_argument("--calibrant", help="a pyFAI calibrant (e.g. AgBh, LaB6, CeO2): its lines' q")
    s.add_argument("--ebeam", type=float, default=None, help="beam energy in keV (default 9.5)")
    s.add_argument("--dis-to-sam", type=float, default=None,
                   help="a known distance in mm (not fitted then)")
    s.add_argument("--fit-tilt", action="store_true", help="also fit the tilts tx, ty "
                                                           "(needs --ring or --calibrant)")
    s.add_argument("--tx", type=float, default=0.0, help="fixed tilt tx in degrees")
    s.add_argument("--ty", type=float, default=0.0, help="fixed tilt ty in degrees")
    s.add_argument("--guess", help="X,Y (um): where the rings' centre roughly is")
    s.add_argument("--threshold", type=float, default=95.0,
                   help="percentile of the good pixels above which pixels are ring points")
    s.add_argument("--smooth", type=float, default=1.0, help="Gaussian smoothing in pixels")
    s.add_argument("--mask", help="a user mask (.npy, non-zero = good) for the fit")
    s.add_argument("--min-points", type=int, default=40, help="fewest points of a ring")
    s.add_argument("--max-rings", type=int, default=10)
    s.add_argument("--png", help="a picture with the fitted rings")
    s.add_argument("--poni", help="write the geometry as a pyFAI PONI file")
    s.add_argument("--json", help="write the result as JSON")
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.set_defaults(func=cmd_beamcenter)

    s = sub.add_parser("mask", help="a user mask (raw shape, .npy) drawn on an average image")
    s.add_argument("avimage", help="average-image file from `gpusmd avimage`")
    s.add_argument("--above", type=float, help="mask pixels of the image above this value")
    s.add_argument("--below", type=float, help="mask pixels of the image below this value")
    s.add_argument("--rect", action="append", metavar="R0:R1,C0:C1")
    s.add_argument("--circle", action="append", metavar="R,C,RADIUS")
    s.add_argument("--polygon", action="append", metavar="'R,C R,C R,C ...'")
    s.add_argument("--units", choices=("px", "um"), default="px",
                   help="shapes in the assembled image's pixels (row, col) or in x, y um")
    s.add_argument("--from-status", metavar="BITS",
                   help="mask pixels with any of these status bits in any gain range (1,4 or 0x5)")
    s.add_argument("--calib-mask", action="store_true",
                   help="also mask what the calibration's mask masks")
    s.add_argument("--start", help="a mask (.npy) to add to")
    s.add_argument("-o", "--output", required=True, help="the mask, .npy")
    s.add_argument("--png", help="a picture of the mask over the image")
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.set_defaults(func=cmd_mask)

    s = sub.add_parser("cube", help="features (and calibrated images) binned by a per-event "
                                    "value; `cube merge A.h5 B.h5 -o C.h5` adds cubes",
                       description="Bin per-event values of small-data files by --bin. "
                                   "`gpusmd cube merge CUBE.h5 CUBE.h5 ... -o merged.h5` adds "
                                   "cubes of the same bins and datasets (exact sums: the same "
                                   "bits as the cube of all their events at once). A "
                                   "small-data file named merge is ./merge.")
    s.add_argument("smd", nargs="+", help="small-data file(s) from `gpusmd replay` (or: merge "
                                          "and cube files)")
    s.add_argument("--bin", action="append", metavar="NAME:EDGES",
                   help="binning: scan/var:e0,e1,... or scan/var:lo:hi:n (repeat for more "
                        "dimensions)")
    s.add_argument("--filter", action="append", metavar="EXPR",
                   help="per-event cut, e.g. 'ipm2/sum>1000' (repeat or join with &)")
    s.add_argument("--keys", action="append", metavar="PATH",
                   help="only these per-event datasets (or groups, e.g. epix10kquad)")
    s.add_argument("--raw", action="append", metavar="RUN",
                   help="the raw run of each small-data file: calibrated images per bin too")
    s.add_argument("--config", help="the config of the calibration (with --raw)")
    s.add_argument("-o", "--output", required=True, help="cube file (HDF5)")
    _add_run_options(s)
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--mpi", action="store_true",
                   help="one rank of an MPI job: the ranks share the --raw runs' frames, "
                        "rank 0 writes the cube")
    s.set_defaults(func=cmd_cube)

    s = sub.add_parser("plot", help="pictures of a small-data file: mean image with ROIs and "
                                    "azav centre, azimuthal profile, ROI sums against the beam "
                                    "intensity, common-mode and error counts")
    s.add_argument("smd", help="small-data file from `gpusmd replay` or the sink")
    s.add_argument("-o", "--output", metavar="DIR",
                   help="write every picture, DIR/<det>_{image,azav,roi,counts}.png")
    s.add_argument("--png", metavar="FILE", help="write the four pictures in one (default, "
                                                 "without -o: the small-data file's name, .png)")
    s.add_argument("--det", help="only this detector (default: every one; several give "
                                 "FILE_<det>.png)")
    s.add_argument("--intensity", metavar="PATH",
                   help="the beam-intensity scalar (default: the first named like ipm, gmd, "
                        "intensity)")
    s.add_argument("--force", action="store_true", help="replace existing pictures")
    s.set_defaults(func=cmd_plot)
