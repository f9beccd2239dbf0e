"""Video in and out, one idea per file:

    frames.py       the Video record (uint8 [F, H, W, 3] RGB, fps, source indices) and the model's [-1, 1] range
    reading.py      decode a clip or an image folder, selecting frames
    orientation.py  stand frames upright as players show them (display matrix, rotate tag)
    pixels.py       any decoded pixel format to 8-bit RGB (range, matrix, bit depth)
    timing.py       when each source frame is shown (variable frame rates) and which ones a constant rate keeps
    size.py         fit frames to the UNet's 64 px grid (resize, centre-crop)
    audio.py        the sound of the edited span, read and muxed into the outputs
    writing.py      H.264 mp4 and PNG frames, written atomically
    sample_clip.py  the project's procedurally drawn sample clip (video=sample)
"""

from .frames import Video, from_model_range, side_by_side, to_model_range
from .reading import READER_VERSION, image_files, read_video
from .size import fit_to_size
from .writing import write_png_frames, write_video

__all__ = [
    "READER_VERSION", "Video", "fit_to_size", "from_model_range", "image_files", "read_video", "side_by_side", "to_model_range",
    "write_png_frames", "write_video",
]
