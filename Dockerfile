# The HTTP reader (serve.py) for a folder of ONNX models, served by name, without TensorFlow or Keras.
#   python export_safe.py --in_keras saved_model/crnn_ctc_best.keras --out_keras models/site-a.onnx --format onnx
#   docker build -t captcha-reader .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" captcha-reader
#   curl -F image=@captcha.png http://127.0.0.1:8000/read/site-a
# Models copied into the mounted folder are served within seconds, with no restart.
FROM python:3.11-slim
WORKDIR /app
COPY requirements-serve.txt .
RUN pip install --no-cache-dir -r requirements-serve.txt
COPY arithmetic.py charsets.py cli.py errors.py imagefiles.py label_sources.py modelfolder.py modelmeta.py preprocess.py \
     reader.py serve.py twin.py ./
USER nobody
EXPOSE 8000
ENTRYPOINT ["python", "serve.py", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--models", "/models"]
