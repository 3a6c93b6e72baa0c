"""Video editing through layered atlases (Text2Live / Neural Layered Atlases): the compute.

- ``io``: PyAV probe / decode / encode, :class:`~pixelmill.tasks.video.io.VideoError`.
- ``atlas``: the :class:`~pixelmill.tasks.video.atlas.Atlas` every method returns (save/load).
- ``homography``: fast single-layer mosaic atlas for static scenes and camera pans.
- ``neural``: Neural Layered Atlases (background + foreground), small and CPU-trainable.
- ``render``: render frames from (edited) atlases, composite RGBA edits onto an atlas.
- ``metrics``: PSNR and flow-based temporal consistency.
- ``synthetic``: clips with known motion for tests and the demo.

Submodules import their heavy dependencies (cv2, torch, av) themselves; this package
imports nothing eagerly.
"""
