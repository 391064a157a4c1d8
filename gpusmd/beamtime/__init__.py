"""The tools of the first day of a beamtime, as smalldata_tools' SmallDataAna_psana offers
them: an average image of a run (:mod:`.avimage`, AvImage / plotAvImage), the beam centre
and distance fitted to its rings (:mod:`.beamcenter`, fitCenter / FindFitCenter), a user
mask drawn on it (:mod:`.mask`) and features or images binned by a scan variable
(:mod:`.cube`, makeCubeData). The command-line front ends are in :mod:`.commands`."""
