"""tf_charrnn: character-level RNN language models trained with TensorFlow/Keras 3.

Data flows one way: text file -> Vocab + ids (data) -> TextLoader batches -> model (models)
-> train step (train) -> checkpoint in a run directory (runs) -> Generator (sample) -> text.
"""

from tf_charrnn import tfenv

tfenv.install()  # TensorFlow's load-time noise off the terminal (see tfenv)

__version__ = "0.1.0"
