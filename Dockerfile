FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY storage ./storage
RUN pip install --no-cache-dir .
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["bastion"]
CMD ["serve", "--root", "/data", "--listen", "0.0.0.0:5000"]
