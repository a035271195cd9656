# The HTTP reader (serve.py) for an ONNX model, without TensorFlow or Keras.
#   python export_safe.py --in_keras saved_model/crnn_ctc_best.keras --out_keras saved_model/model.onnx --format onnx
#   docker build -t captcha-reader .
#   docker run --rm -p 8000:8000 -v "$PWD/saved_model:/models:ro" captcha-reader
#   curl -F image=@captcha.png http://127.0.0.1:8000/read
FROM python:3.11-slim
WORKDIR /app
COPY requirements-serve.txt .
RUN pip install --no-cache-dir -r requirements-serve.txt
COPY augment.py modelmeta.py preprocess.py reader.py serve.py ./
USER nobody
EXPOSE 8000
ENTRYPOINT ["python", "serve.py", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/model.onnx"]
